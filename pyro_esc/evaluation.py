"""Moved to :mod:`pyro_esc.evaluate.elbo`; this import path keeps working (it is the same module)."""

import sys

from .evaluate import elbo as _moved

sys.modules[__name__] = _moved
