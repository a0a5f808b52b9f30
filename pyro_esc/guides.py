"""Moved to :mod:`pyro_esc.variational.guides`; this import path keeps working (it is the same module)."""

import sys

from .variational import guides as _moved

sys.modules[__name__] = _moved
