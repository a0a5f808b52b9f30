"""Moved to :mod:`pyro_esc.infer.objectives`; this import path keeps working (it is the same module)."""

import sys

from .infer import objectives as _moved

sys.modules[__name__] = _moved
