"""Moved to :mod:`pyro_esc.train.history`; this import path keeps working (it is the same module)."""

import sys

from .train import history as _moved

sys.modules[__name__] = _moved
