"""Moved to :mod:`pyro_esc.train.checkpoint`; this import path keeps working (it is the same module)."""

import sys

from .train import checkpoint as _moved

sys.modules[__name__] = _moved
