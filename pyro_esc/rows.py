"""Moved to :mod:`pyro_esc.variational.rows`; this import path keeps working (it is the same module)."""

import sys

from .variational import rows as _moved

sys.modules[__name__] = _moved
