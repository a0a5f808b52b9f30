"""Moved to :mod:`pyro_esc.train.steppers`; this import path keeps working (it is the same module)."""

import sys

from .train import steppers as _moved

sys.modules[__name__] = _moved
