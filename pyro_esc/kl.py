"""Moved to :mod:`pyro_esc.distributions.kl`; this import path keeps working (it is the same module)."""

import sys

from .distributions import kl as _moved

sys.modules[__name__] = _moved
