"""Moved to :mod:`pyro_esc.infer.solver`; this import path keeps working (it is the same module)."""

import sys

from .infer import solver as _moved

sys.modules[__name__] = _moved
