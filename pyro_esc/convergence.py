"""Moved to :mod:`pyro_esc.train.convergence`; this import path keeps working (it is the same module)."""

import sys

from .train import convergence as _moved

sys.modules[__name__] = _moved
