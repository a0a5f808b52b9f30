"""Moved to :mod:`pyro_esc.variational.semi_amortized`; this import path keeps working (it is the same module)."""

import sys

from .variational import semi_amortized as _moved

sys.modules[__name__] = _moved
