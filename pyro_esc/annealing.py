"""Moved to :mod:`pyro_esc.infer.annealing`; this import path keeps working (it is the same module)."""

import sys

from .infer import annealing as _moved

sys.modules[__name__] = _moved
