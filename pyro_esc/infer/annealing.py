"""Entropy annealing: weights on the three entropy terms of L_H (docs/theory.md, Annealing).

::

    L_beta = beta_q 1/N sum_n H[q^(n)] - beta_p H[p(z)] - beta_x H[p(x|z)]

Each weight follows a schedule over training progress t in [0, 1] that reaches
1 at t = 1 (and stays 1 after), so the final objective is the true L_H.

- beta_q > 1 early is a temperature: broad posteriors and a smoother landscape,
  so that the dictionary is shaped by many data points before the posteriors
  commit to few causes.
- beta_p changes the pressure on lambda: beta_p > 1 penalises large prior
  scales more, i.e. pushes towards sparser codes.
- beta_x weights the reconstruction entropy (the noise level).

The default, :meth:`Annealing.default`, anneals only beta_q linearly from 2 to
1 over the annealing period: the temperature reading of docs/theory.md (Annealing), with
the other two terms untouched. Why only beta_q: with beta_p > beta_q (beta_p > 1 or beta_q < 1)
a latent switched off (q's scale s_h -> 0, hence lambda_h* ~ s_h -> 0) adds
(beta_q - beta_p) log s_h + const to the weighted objective, which grows without
bound: training under it rewards switching latents off rather than explaining
the data. With beta_q > beta_p the same term keeps posteriors broad instead.

What it does (measured by ``pyro-esc reproduce`` and ``pyro-esc bars [--anneal
STEPS]``; the numbers are in docs/guide/results.md, "Results"): on whitened natural
image patches, per-point diagonal posteriors end at a higher true ELBO, with
sparser codes and more localised fields; the amortised encoder of the patches
experiment ends lower (a 100-unit encoder ended higher), with slightly more
localised fields but less sparse codes. On the bars test it
hurts full covariances: on the seeds tried they find every bar without
annealing and none with it, while diagonal posteriors barely notice. Annealing
is therefore opt-in (``fit(..., annealing="default")``,
``EntropyELBO(annealing=...)``, ``--anneal``), not on by default.
"""

import math
import numbers

from .._checks import check_int


class Schedule:
    """A weight as a function of training progress t in [0, 1] with value 1 at t = 1.

    Build one with :func:`constant`, :func:`linear`, :func:`exponential`,
    :func:`step`, or from any callable ``f(t)`` with ``f(1) == 1``.
    """

    def __init__(self, function, name="custom"):
        if not callable(function):
            raise ValueError(f"a schedule must be callable f(t) for t in [0, 1], got {function!r}")
        end = float(function(1.0))
        if not math.isclose(end, 1.0, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"a schedule must end at 1 (f(1) == 1) so the final objective is the true one; "
                             f"{name} gives f(1) = {end}")
        self.function = function
        self.name = name

    def __call__(self, progress):
        value = float(self.function(min(max(float(progress), 0.0), 1.0)))
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"schedule {self.name} gave {value} at t = {progress}; weights must be finite and >= 0")
        return value

    def __repr__(self):
        return f"Schedule({self.name})"


def _check_start(start):
    if isinstance(start, bool) or not isinstance(start, numbers.Real) or not math.isfinite(start) or start < 0:
        raise ValueError(f"start must be a finite number >= 0, got {start!r}")
    return float(start)


def constant(value):
    """``value`` during annealing (t < 1), then 1."""
    value = _check_start(value)
    return Schedule(lambda t: value if t < 1 else 1.0, f"constant({value:g})")


def linear(start):
    """Linear from ``start`` at t = 0 to 1 at t = 1."""
    start = _check_start(start)
    return Schedule(lambda t: start + (1.0 - start) * t, f"linear({start:g})")


def exponential(start):
    """Geometric from ``start`` (> 0) to 1: start^(1 - t)."""
    start = _check_start(start)
    if start == 0:
        raise ValueError("an exponential schedule needs start > 0")
    return Schedule(lambda t: start ** (1.0 - t), f"exponential({start:g})")


def step(start, at=0.5):
    """``start`` until t = ``at``, then 1."""
    start = _check_start(start)
    if not 0 <= at <= 1:
        raise ValueError(f"at must be in [0, 1], got {at!r}")
    return Schedule(lambda t: start if t < at else 1.0, f"step({start:g}, at={at:g})")


def staircase(start, levels):
    """``levels`` equal steps down from ``start``, then 1: f(t) = max(1, start - (start / levels) floor(levels t)).

    With start 10 and 5 levels over five epochs: 10, 8, 6, 4, 2 in epochs 1-5, then 1.
    """
    start = _check_start(start)
    levels = check_int(levels, "levels")
    return Schedule(lambda t: max(1.0, start - (start / levels) * math.floor(levels * t)),
                    f"staircase({start:g}, {levels})")


_ONE = Schedule(lambda t: 1.0, "1")


def as_schedule(value, name):
    """A :class:`Schedule` from a Schedule, a callable, or None (always 1)."""
    if value is None:
        return _ONE
    if isinstance(value, Schedule):
        return value
    if callable(value):
        return Schedule(value, name)
    raise ValueError(f"{name} must be a Schedule, a callable f(t) with f(1) = 1, or None; got {value!r}")


class Annealing:
    """Weights (beta_q, beta_p, beta_x) for the three entropy terms, over ``num_steps`` steps.

    After ``num_steps`` training steps every weight is 1.

    :param int num_steps: length of the annealing period in optimisation steps.
    :param posterior: schedule for beta_q (posterior entropy), or None for 1.
    :param prior: schedule for beta_p (prior entropy H[p(z)]), or None for 1.
    :param likelihood: schedule for beta_x (likelihood entropy H[p(x|z)]), or None for 1.
    """

    def __init__(self, num_steps, posterior=None, prior=None, likelihood=None):
        self.num_steps = check_int(num_steps, "num_steps")
        self.posterior = as_schedule(posterior, "posterior")
        self.prior = as_schedule(prior, "prior")
        self.likelihood = as_schedule(likelihood, "likelihood")

    @classmethod
    def default(cls, num_steps):
        """beta_q linear from 2 to 1 over ``num_steps``; beta_p = beta_x = 1 (see the module docstring)."""
        return cls(num_steps, posterior=linear(2.0))

    @classmethod
    def authors(cls, steps_per_epoch, epochs=5, start=10.0):
        """The prior-entropy annealing of the authors' natural-image runs: beta_p = 10, 8, 6, 4, 2, then 1.

        beta_p steps down once an epoch over the first ``epochs`` epochs (a
        :func:`staircase`); beta_q = beta_x = 1. Note the module docstring: with
        beta_p > beta_q the weighted objective rewards switching latents off, so
        this schedule favours sparse codes while it lasts; it is offered to
        reproduce and compare the authors' setting (BENCHMARKS.md, "Learning at scale").

        :param int steps_per_epoch: optimisation steps per epoch.
        """
        steps_per_epoch = check_int(steps_per_epoch, "steps_per_epoch")
        epochs = check_int(epochs, "epochs")
        return cls(steps_per_epoch * epochs, prior=staircase(start, epochs))

    def betas(self, step):
        """(beta_q, beta_p, beta_x) after ``step`` completed optimisation steps."""
        progress = step / self.num_steps
        return self.posterior(progress), self.prior(progress), self.likelihood(progress)

    def __repr__(self):
        return (f"Annealing(num_steps={self.num_steps}, posterior={self.posterior.name}, "
                f"prior={self.prior.name}, likelihood={self.likelihood.name})")
