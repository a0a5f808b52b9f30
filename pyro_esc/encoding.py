"""Moved to :mod:`pyro_esc.apps.encoding`; this import path keeps working (it is the same module)."""

import sys

from .apps import encoding as _moved

sys.modules[__name__] = _moved
