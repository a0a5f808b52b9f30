"""Moved to :mod:`pyro_esc.apps.denoising`; this import path keeps working (it is the same module)."""

import sys

from .apps import denoising as _moved

sys.modules[__name__] = _moved
