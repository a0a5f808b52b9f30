"""Moved to :mod:`pyro_esc.evaluate.likelihood`; this import path keeps working (it is the same module)."""

import sys

from .evaluate import likelihood as _moved

sys.modules[__name__] = _moved
