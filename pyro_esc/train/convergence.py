"""When to stop: a convergence test on an exact objective.

A deterministic objective can tell when training is done. :class:`Convergence`
watches the exact ELBO per data point f_t after each step (and, where known,
the norm of the gradient of the per-point loss) and declares convergence when,
over the last ``window`` steps::

    |f_t - f_{t - window}| <= tol * max(1, |f_t|)      and      ||grad||_2 <= gtol

i.e. the objective has stopped moving relative to its size and no gradient is
left to follow. With ``gtol=None`` only the first test is made.
"""

import math
from collections import deque



class ConvergenceWarning(UserWarning):
    """A run (or a solve) reached its step limit without meeting its convergence test."""


class Convergence:
    """The stopping test of :func:`~pyro_esc.fit` (see the module docstring).

    :param float tol: relative change of the objective over ``window`` steps.
    :param float gtol: bound on the gradient norm of the per-point loss, or None.
    :param int window: number of steps the change is measured over.
    """

    def __init__(self, tol, gtol=None, window=10):
        self.tol = tol
        self.gtol = gtol
        self.window = window
        self._values = deque(maxlen=window + 1)
        self.reason = None

    def update(self, value, grad_norm=None):
        """Feed the exact objective after a step (and its gradient norm); return whether converged."""
        self._values.append(float(value))
        if len(self._values) <= self.window:
            return False
        change = abs(self._values[-1] - self._values[0])
        scale = max(1.0, abs(self._values[-1]))
        if not change <= self.tol * scale:
            return False
        if self.gtol is not None and grad_norm is not None and not grad_norm <= self.gtol:
            return False
        gradient = "" if grad_norm is None or self.gtol is None else f", gradient norm {grad_norm:.2g} <= {self.gtol:g}"
        self.reason = (f"converged: relative change {change / scale:.2g} <= tol {self.tol:g} over "
                       f"{self.window} steps{gradient}")
        return True

    @staticmethod
    def check(tol, gtol, window):
        """Validate the arguments (a ValueError naming the bad one); return them as numbers."""
        for name, value in (("tol", tol), ("gtol", gtol)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        return tol, gtol, window
