"""Moved to :mod:`pyro_esc.train.standard_units`; this import path keeps working (it is the same module)."""

import sys

from .train import standard_units as _moved

sys.modules[__name__] = _moved
