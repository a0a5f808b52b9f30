"""Moved to :mod:`pyro_esc.apps.warm_start`; this import path keeps working (it is the same module)."""

import sys

from .apps import warm_start as _moved

sys.modules[__name__] = _moved
