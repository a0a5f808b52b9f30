"""Moved to :mod:`pyro_esc.distributions.gaussian`; this import path keeps working (it is the same module)."""

import sys

from .distributions import gaussian as _moved

sys.modules[__name__] = _moved
