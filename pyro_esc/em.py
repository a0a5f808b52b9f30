"""Moved to :mod:`pyro_esc.train.em`; this import path keeps working (it is the same module)."""

import sys

from .train import em as _moved

sys.modules[__name__] = _moved
