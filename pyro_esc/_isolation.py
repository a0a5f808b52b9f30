"""Moved to :mod:`pyro_esc.train._isolation`; this import path keeps working (it is the same module)."""

import sys

from .train import _isolation as _moved

sys.modules[__name__] = _moved
