"""Moved to :mod:`pyro_esc.infer.statistics`; this import path keeps working (it is the same module)."""

import sys

from .infer import statistics as _moved

sys.modules[__name__] = _moved
