"""Moved to :mod:`pyro_esc.apps.sklearn`; this import path keeps working (it is the same module)."""

import sys

from .apps import sklearn as _moved

sys.modules[__name__] = _moved
