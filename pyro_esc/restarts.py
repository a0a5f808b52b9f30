"""Moved to :mod:`pyro_esc.train.restarts`; this import path keeps working (it is the same module)."""

import sys

from .train import restarts as _moved

sys.modules[__name__] = _moved
