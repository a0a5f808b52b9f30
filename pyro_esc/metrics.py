"""Moved to :mod:`pyro_esc.evaluate.metrics`; this import path keeps working (it is the same module)."""

import sys

from .evaluate import metrics as _moved

sys.modules[__name__] = _moved
