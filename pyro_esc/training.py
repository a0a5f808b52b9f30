"""Moved to :mod:`pyro_esc.train.loop`; this import path keeps working (it is the same module)."""

import sys

from .train import loop as _moved

sys.modules[__name__] = _moved
