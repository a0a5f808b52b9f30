"""Moved to :mod:`pyro_esc.apps.lightning`; this import path keeps working (it is the same module)."""

import sys

from .apps import lightning as _moved

sys.modules[__name__] = _moved
