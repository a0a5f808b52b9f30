"""Moved to :mod:`pyro_esc.variational.posterior`; this import path keeps working (it is the same module)."""

import sys

from .variational import posterior as _moved

sys.modules[__name__] = _moved
