"""Moved to :mod:`pyro_esc.train.rowwise`; this import path keeps working (it is the same module)."""

import sys

from .train import rowwise as _moved

sys.modules[__name__] = _moved
