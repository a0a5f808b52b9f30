"""Moved to :mod:`pyro_esc.models.sparse_coding`; this import path keeps working (it is the same module)."""

import sys

from .models import sparse_coding as _moved

sys.modules[__name__] = _moved
