"""What :func:`~pyro_esc.fit` records: :class:`History`, and the one function that writes it."""

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

#: How ``History.elbo`` was obtained, by kind of objective and batch.
EXACT = "exact"  #: closed form on the full data
RUNNING = "running estimate"  #: EntropyELBO on minibatches: batch rows current, the others as last visited
BATCH = "batch estimate"  #: a closed-form objective evaluated on the minibatch alone
MONTE_CARLO = "monte carlo"  #: a sampled objective (e.g. Trace_ELBO)
CHUNK = "chunk estimate"  #: the EM route on minibatches: the current chunk's solved posteriors at the model


@dataclass
class History:
    """What :func:`~pyro_esc.fit` recorded (lists of floats, one entry per recorded step).

    Two ELBO series, per data point (higher is better):

    - ``elbo`` (with ``loss`` = -N ``elbo``, Pyro's sign and scale) is the
      objective as training saw it at every recorded step; ``elbo_kind`` says
      what it is: ``"exact"`` (a closed-form objective on the full data; for
      :class:`~pyro_esc.EntropyELBO` the value after the step), ``"running
      estimate"`` (EntropyELBO on minibatches: exact for the batch, the other
      points as last visited), ``"chunk estimate"`` (the EM route on minibatches:
      the ELBO per point of the posteriors solved since the last M-step, at the
      model), ``"batch estimate"`` or ``"monte carlo"``.
      Under annealing it is the true, unweighted objective.
    - ``eval_elbo`` at ``eval_step`` is the exact ELBO per data point on the
      full data, evaluated without changing anything (``eval_kind`` says which:
      ``"exact"`` for Gaussian guides, else a Monte Carlo estimate), every
      ``eval_every`` steps and after the last step. Report this one:
      :attr:`final_elbo`.

    How the run went: ``route`` (the name ``fit(optimizer=...)`` takes: ``"lbfgs"``, ``"rowwise"``,
    ``"em"`` or ``"svi"``; ``"torch"`` for another torch optimiser) and ``optimizer`` (its class name), ``converged`` and ``stop_reason`` (the convergence test
    met, or the step limit), ``evaluations`` (objective-and-gradient
    evaluations, line searches included), ``grad_norm`` (the gradient norm of the
    per-point loss at each recorded step, NaN where the route does not know it),
    ``wall_time`` (seconds since the start of the run). With restarts
    (``n_init``), ``restart_elbos`` holds every run's final exact ELBO and
    ``best_restart`` the index of the run kept (this history's). ``finish_step`` is the step
    after which a run that had stalled in float32 went on in float64 (``fit(finish_in_float64=True)``),
    or None. ``annealing_cut`` is the step at which the run had converged (or stalled) on the
    annealed objective before its schedule ended, so the schedule was cut there and the run went
    on with every weight 1 (the true objective), or None.

    ``unit`` is the unit the optimiser worked in: fit's gradient routes with a guide that rescales exactly
    train on the data divided by a power of two near their root mean square over 2
    (:mod:`pyro_esc.standard_units`), else 1.
    Every number recorded here is in the data's own units all the same (ELBO per point, loss, lambda,
    sigma^2); only ``grad_norm`` is the gradient in the optimiser's units.

    ``trace_elbo`` holds optional Monte Carlo checks with Pyro's ``Trace_ELBO``
    at ``trace_elbo_step``.

    Example::

        >>> import pyro
        >>> from pyro_esc import SparseCoding, LocalMultivariateNormal, fit
        >>> from pyro_esc.data import bars
        >>> pyro.clear_param_store()
        >>> x, _ = bars(100, seed=0)
        >>> model = SparseCoding(25, 10)
        >>> history = fit(model, LocalMultivariateNormal(model), x, steps=20, tol=None, progress=False)
        >>> history.step[-1], history.route, history.stop_reason
        (20, 'lbfgs', 'step limit: 20 steps')
        >>> history.final_elbo > history.elbo[0]
        True

    """

    num_data: int = 0
    elbo_kind: str = EXACT
    eval_kind: str = EXACT
    route: str = "svi"
    optimizer: str = ""
    converged: bool = False
    stop_reason: str = ""
    evaluations: int = 0
    best_restart: int = 0
    finish_step: Optional[int] = None
    annealing_cut: Optional[int] = None
    unit: float = 1.0
    data_dim: int = 0
    restart_elbos: List[float] = field(default_factory=list)
    step: List[int] = field(default_factory=list)
    epoch: List[float] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    elbo: List[float] = field(default_factory=list)
    prior_scale: List[List[float]] = field(default_factory=list)
    noise_var: List[float] = field(default_factory=list)
    wall_time: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    betas: List[List[float]] = field(default_factory=list)
    grad_norm: List[float] = field(default_factory=list)
    eval_step: List[int] = field(default_factory=list)
    eval_elbo: List[float] = field(default_factory=list)
    trace_elbo_step: List[int] = field(default_factory=list)
    trace_elbo: List[float] = field(default_factory=list)

    def __len__(self):
        return len(self.step)

    @property
    def final_elbo(self):
        """The exact full-data ELBO per data point after the last step (NaN before any evaluation)."""
        return self.eval_elbo[-1] if self.eval_elbo else math.nan

    def __repr__(self):
        # The run in one line; the per-step lists are in the fields (to_dict() has them all).
        steps = self.step[-1] if self.step else 0
        return (f"History(route={self.route!r}, optimizer={self.optimizer!r}, steps={steps}, "
                f"final_elbo={self.final_elbo:.6g}, converged={self.converged}, stop_reason={self.stop_reason!r})")

    def to_dict(self):
        """Plain lists and numbers (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state):
        return cls(**state)

    def in_data_units(self, elbo):
        """An ELBO per point evaluated on the data in the optimiser's units, in the data's own:
        ``elbo - D log unit`` (data times c have the ELBO minus D log c)."""
        return elbo - self.data_dim * math.log(self.unit) if self.unit != 1.0 else elbo

    def record(self, step, epoch, value, model, lr, betas, wall_time, grad_norm=None):
        """Append one recorded step: the objective ``value`` (a loss, in the optimiser's units), the model's
        scales, and context; stored in the data's own units (see ``unit``)."""
        self.step.append(step)
        self.epoch.append(epoch)
        elbo = self.in_data_units(-value / self.num_data)
        self.loss.append(-elbo * self.num_data if self.unit != 1.0 else value)
        self.elbo.append(elbo)
        prior_scale = getattr(model, "prior_scale", None)
        noise_var = getattr(model, "noise_var", None)
        self.prior_scale.append((prior_scale.detach() * self.unit).cpu().tolist() if prior_scale is not None else [])
        self.noise_var.append(float(noise_var.detach()) * self.unit ** 2 if noise_var is not None else float("nan"))
        self.wall_time.append(wall_time)
        self.lr.append(lr)
        self.betas.append(list(betas))
        self.grad_norm.append(math.nan if grad_norm is None else float(grad_norm))

    def progress_postfix(self):
        """A short summary of the last record, for a progress bar."""
        postfix = {"elbo": f"{self.elbo[-1]:.4f}"}
        if self.prior_scale[-1]:
            postfix["lambda"] = f"{sum(self.prior_scale[-1]) / len(self.prior_scale[-1]):.3g}"
        if math.isfinite(self.noise_var[-1]):
            postfix["sigma2"] = f"{self.noise_var[-1]:.3g}"
        return postfix
