"""Moved to :mod:`pyro_esc.evaluate.reference`; this import path keeps working (it is the same module)."""

import sys

from .evaluate import reference as _moved

sys.modules[__name__] = _moved
