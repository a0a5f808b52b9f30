"""The training loop: :func:`fit` trains a model and guide and records what happened.

One function owns the loop so that every experiment, notebook and the command
line train the same way: L-BFGS to convergence on the exact objective or SVI
steps on minibatches, restarts, learning-rate schedules, a seed, the device, a
progress bar, a :class:`~pyro_esc.History`, checkpoints that resume bit-for-bit
on CPU (:mod:`pyro_esc.checkpoint`), and a clear stop when anything turns
non-finite.

``fit`` is three parts: :func:`check_fit_options` validates every argument once,
before training; :func:`training_step` is one step (the route's update from
:mod:`pyro_esc.steppers`, then, for :class:`~pyro_esc.EntropyELBO`, the
explicit ``update`` that writes lambda*, sigma^2* into the model);
:class:`~pyro_esc.History` records, and :mod:`pyro_esc.convergence` decides
when to stop.
"""

import math
import numbers
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
# The text bar, also in notebooks: it is saved with an executed notebook as its final line and renders on
# GitHub, where tqdm.auto's widget would be saved at 0%.
from tqdm.std import tqdm

import pyro
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuide

from .._checks import check_data, check_device, check_int, check_magnitude, check_positive
from ._isolation import check_owns_its_parameters, tie_to_data
from .._pyro_internals import module_name
from ..infer.annealing import Annealing
from .checkpoint import (  # noqa: F401 - CHECKPOINT_FORMAT and load_checkpoint: public here too
    CHECKPOINT_FORMAT,
    data_fingerprint,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from .convergence import Convergence, ConvergenceWarning  # noqa: F401 - ConvergenceWarning: public here too
from .em import EM, EMStep
from ..variational.guides import AmortizedNormal, covariance_family
from .history import BATCH, CHUNK, EXACT, MONTE_CARLO, RUNNING, History
from ..models.sparse_coding import MODEL_PARAMETERS
from ..infer.objectives import AnalyticELBO, EntropyELBO, NonFiniteObjectiveError, analytic_elbo_per_point, entropy_elbo_per_point
from .restarts import check_restartable, reinitialize, restore, snapshot
from ..variational.rows import offers_row_access
from .rowwise import RowwiseStep
from .standard_units import data_unit, in_standard_units, trains_in_standard_units
from .steppers import SVIStep, TorchStep, lbfgs

#: sigma^2* below this fraction of the data's mean variance means the model fits the data exactly
#: (e.g. constant data, or data of rank <= H): the ELBO then grows without bound. (At 1e-10 a run on
#: 300 digits with H = 64 reported convergence at sigma^2* = 1.3e-10 of the variance.)
NOISE_COLLAPSE = 1e-8

#: sigma^2 above (1 - this) times the data's variance after training means the codes explain nothing.
NOTHING_EXPLAINED = 1e-3


def _default_lr_schedule(name):
    # A schedule maps training progress t in [0, 1] to a factor on the learning rate.
    if name is None or name == "constant":
        return lambda t: 1.0
    if name == "cosine":
        return lambda t: 0.5 * (1 + math.cos(math.pi * t)) * 0.9 + 0.1
    if name == "exponential":
        return lambda t: 0.1 ** t
    if callable(name):
        return name
    raise ValueError(f"lr_schedule must be None, 'constant', 'cosine', 'exponential' or a callable "
                     f"f(progress) -> factor, got {name!r}")


def _check_lr_factor(schedule, progress):
    """The schedule's factor at ``progress``, if it is a finite number >= 0 (else a ValueError saying so)."""
    factor = schedule(progress)
    if isinstance(factor, torch.Tensor) and factor.numel() == 1:
        factor = factor.item()
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor) or factor < 0:
        raise ValueError(f"lr_schedule returned {factor!r} at progress {progress:g}; it must return a finite number "
                         f">= 0, the factor on lr at that point of training (progress in [0, 1])")
    return float(factor)


class _Batches:
    """Minibatch indices: a fresh random permutation per epoch from a private generator."""

    def __init__(self, num_data, batch_size, seed):
        self.num_data = num_data
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = None
        self.position = 0

    @property
    def full(self):
        return self.batch_size >= self.num_data

    @property
    def steps_per_epoch(self):
        return 1 if self.full else math.ceil(self.num_data / self.batch_size)

    def next(self):
        if self.full:
            return None
        if self.order is None or self.position >= self.num_data:
            self.order = torch.randperm(self.num_data, generator=self.generator)
            self.position = 0
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def reset(self, seed):
        """Start a new run: a fresh order from ``seed``."""
        self.generator.manual_seed(seed)
        self.order, self.position = None, 0

    def state_dict(self):
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


#: Optimiser names :func:`fit` understands (a torch optimiser class or factory works too).
OPTIMIZERS = ("auto", "lbfgs", "svi", "rowwise", "em")
#: The SVI route's default Adam learning rate.
DEFAULT_LR = 0.05
#: The row-wise route's defaults: Adam's learning rate (rows and dictionary) and updates of each
#: batch's posteriors per step (chosen by benchmarks/minibatch_route.py; README, "Paper scale").
ROWWISE_LR, ROWWISE_INNER_STEPS = 0.4, 4
#: Steps of the torch route when neither steps nor epochs is given: an upper bound, as it stops on convergence.
DEFAULT_MAX_STEPS = 20000
#: The torch route's default convergence test (BENCHMARKS.md, "Bars over sizes, noise levels and seeds").
DEFAULT_TOL, DEFAULT_GTOL, DEFAULT_WINDOW = 1e-7, None, 20
#: The dtype a torch-route run continues in when a lower precision stalls it (``fit(finish_in_float64=True)``).
FINISH_DTYPE = torch.float64


@dataclass
class FitOptions:
    """Every argument of :func:`fit`, validated (see :func:`check_fit_options`)."""

    loss: object
    batches: "_Batches"
    total_steps: int
    route: str  #: "svi", "torch", "rowwise" or "em"
    optim: object  #: the PyroOptim of the SVI route
    optimizer: object  #: the torch optimiser factory of the torch route, the EM options of the EM route
    lr: float
    schedule: Callable
    manage_lr: bool
    record_every: int
    eval_every: Optional[int]
    trace_elbo_every: Optional[int]
    trace_elbo_particles: int
    checkpoint: Optional[str]
    checkpoint_every: Optional[int]
    data_variance: float
    tol: Optional[float]
    gtol: Optional[float]
    window: int
    n_init: int
    frozen: tuple
    inner_steps: int
    finish_in_float64: bool = False
    unit: float = 1.0  #: the data are divided by this for training (pyro_esc.standard_units)

    @property
    def elbo_kind(self):
        """What the per-step objective is (see :class:`~pyro_esc.History`)."""
        if not isinstance(self.loss, (EntropyELBO, AnalyticELBO)):
            return MONTE_CARLO
        if self.batches.full:
            return EXACT
        if self.route == "em":
            return CHUNK
        running = isinstance(self.loss, EntropyELBO) and self.loss.minibatch_statistics == "running"
        return RUNNING if running else BATCH

    def eval_due(self, step):
        """Whether to record the exact full-data ELBO after ``step`` (the last step always is)."""
        return step == self.total_steps or (self.eval_every is not None and step % self.eval_every == 0)

    def make_step(self, model, guide, x):
        """The route's stepper (builds the torch optimiser on the objective's parameters)."""
        if self.route == "svi":
            return SVIStep(model, guide, self.loss, self.optim, x)
        if self.route == "rowwise":
            first = torch.arange(min(self.batches.batch_size, x.size(0)), device=x.device)
            return RowwiseStep(model, guide, self.loss, x, first, self.lr, self.frozen, self.inner_steps)
        if self.route == "em":
            first = None if self.batches.full else torch.arange(self.batches.batch_size, device=x.device)
            em = self.optimizer
            chunk = em.chunk_for(x.size(0), self.batches.batch_size)
            return EMStep(model, guide, self.loss, x, first, self.frozen, chunk=chunk,
                          momentum=em.momentum_for(chunk, x.size(0)), tol=em.tol)
        return TorchStep(model, guide, self.loss, x, self.optimizer, self.frozen)


def check_fit_options(model, guide, x, loss=None, *, optimizer="auto", steps=None, epochs=None, batch_size=None,
                      lr=None, lr_schedule=None, optim=None, seed=0, record_every=1, eval_every=None,
                      trace_elbo_every=None, trace_elbo_particles=16, checkpoint=None, checkpoint_every=None,
                      resume=None, annealing=None, tol="auto", gtol="auto", window=DEFAULT_WINDOW, n_init=1,
                      train_dictionary=True, inner_steps=None, train_model=True, finish_in_float64=True):
    """Validate :func:`fit`'s arguments once, before anything trains; return :class:`FitOptions`.

    Raises a ValueError naming the argument. Sets ``annealing`` on the loss only
    once every argument has passed.
    """
    loss = EntropyELBO() if loss is None else loss
    if not isinstance(loss, pyro.infer.ELBO):
        raise ValueError(f"loss must be a pyro.infer.ELBO (e.g. EntropyELBO()), got {loss!r}")
    data_variance = float(x.var(0, unbiased=False).mean()) if x.size(0) > 1 else 0.0
    if not data_variance > 0 and train_model:
        # With the model fixed (train_model=False, e.g. encoding one new point) the ELBO is bounded.
        raise ValueError("data must vary: every data point is the same, so the model explains it exactly, "
                         "sigma^2 tends to 0 and the ELBO grows without bound")
    batches = _Batches(x.size(0), x.size(0) if batch_size is None else check_int(batch_size, "batch_size"),
                       check_int(seed, "seed", minimum=0))
    # Settings that only gradient routes read say which route the user has in mind (inner_steps, a row-wise
    # setting, keeps "auto" off the EM route).
    svi_settings = optim is not None or lr is not None or lr_schedule is not None
    route, factory = _check_optimizer(optimizer, loss, batches, optim, svi_settings or inner_steps is not None, guide)
    if route == "em" and (lr is not None or lr_schedule is not None or inner_steps is not None):
        given = [name for name, value in (("lr", lr), ("lr_schedule", lr_schedule), ("inner_steps", inner_steps))
                 if value is not None]
        raise ValueError(f"{', '.join(given)}: the EM route has no learning rate or inner steps (its E-step solves "
                         f"each batch's posteriors, its M-step is closed form); leave them out, or pass "
                         f"optimizer='rowwise' or 'svi'")
    if steps is None and epochs is None and (route == "torch" or route == "em" and batches.full):
        steps = DEFAULT_MAX_STEPS
    total_steps = _total_steps(steps, epochs, batches.steps_per_epoch)
    annealing = _check_annealing(annealing, loss, total_steps, batches.steps_per_epoch)
    if route == "em" and annealing is not None:
        _check_bounded(annealing, total_steps)
    if annealing is not None:
        _check_finishes(annealing, total_steps)
    _check_subsampling(guide, loss, batches)
    if lr is None:
        lr = ROWWISE_LR if route == "rowwise" else DEFAULT_LR
    lr = check_positive(lr, "lr")
    schedule = _default_lr_schedule(lr_schedule)
    for progress in (0.0, 0.5, 1.0):
        _check_lr_factor(schedule, progress)
    if route == "torch" and lr_schedule is not None:
        raise ValueError("lr_schedule applies to the SVI route (optimizer='svi'); a torch optimiser takes its "
                         "learning rate from its own arguments, e.g. functools.partial(torch.optim.Adam, lr=0.01)")
    if route == "svi" and optim is None:
        optim = pyro.optim.Adam({"lr": lr})
    elif route == "svi" and not isinstance(optim, pyro.optim.PyroOptim):
        raise ValueError(f"optim must be a pyro.optim.PyroOptim, got {optim!r}")
    # fit sets the SVI learning rate when it owns the optimiser or a schedule asks for it; the row-wise
    # route's optimisers are always fit's own.
    manage_lr = route == "rowwise" or (route == "svi" and (lr_schedule is not None
                                                          or optim.pt_optim_args == {"lr": lr}))
    if route == "svi" and manage_lr and not isinstance(optim.pt_optim_args, dict):
        raise ValueError("lr_schedule needs an optim built from a dict of arguments, e.g. Adam({'lr': 0.05})")
    record_every = check_int(record_every, "record_every")
    if eval_every is None and not batches.full:
        eval_every = batches.steps_per_epoch
    elif eval_every is not None:
        eval_every = check_int(eval_every, "eval_every")
    if trace_elbo_every is not None:
        trace_elbo_every = check_int(trace_elbo_every, "trace_elbo_every")
    trace_elbo_particles = check_int(trace_elbo_particles, "trace_elbo_particles")
    if checkpoint_every is not None:
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every")
        if checkpoint is None:
            raise ValueError("checkpoint_every needs a checkpoint path")
    exact_route = route == "torch" or route == "em" and batches.full
    tol = (DEFAULT_TOL if exact_route else None) if tol == "auto" else tol
    gtol = (DEFAULT_GTOL if route == "torch" else None) if gtol == "auto" else gtol
    if gtol is not None and route == "em":
        raise ValueError("gtol: the EM route has no gradient to test; use tol")
    tol, gtol, window = Convergence.check(tol, gtol, window)
    if gtol is not None and tol is None:
        raise ValueError("gtol needs tol: the gradient test is made together with the objective's change")
    n_init = check_int(n_init, "n_init")
    if n_init > 1:
        if checkpoint is not None or resume is not None:
            raise ValueError("n_init > 1 cannot be combined with checkpoint or resume; checkpoint single runs")
        check_restartable(model, guide)
    frozen = ()
    if not train_dictionary or not train_model:
        if route == "svi":
            raise ValueError("train_dictionary=False and train_model=False need the torch, row-wise or EM route "
                             "(optimizer='lbfgs', 'rowwise', 'em' or a torch optimiser)")
        # The scales matter only to objectives that train them (AnalyticELBO); EntropyELBO sets them.
        frozen = ("raw_dictionary",) if train_model else MODEL_PARAMETERS
    if inner_steps is None:
        inner_steps = ROWWISE_INNER_STEPS if route == "rowwise" else 1
    inner_steps = check_int(inner_steps, "inner_steps")
    if inner_steps > 1 and route != "rowwise":
        raise ValueError("inner_steps applies to the row-wise route (minibatches with a per-point guide)")
    if not isinstance(finish_in_float64, bool):
        raise ValueError(f"finish_in_float64 must be True or False, got {finish_in_float64!r}")
    # Only a torch-route run can stall on the objective's precision, and only a module's parameters can be
    # converted to float64 and back; a checkpoint must hold the dtype it is resumed in.
    finish_in_float64 = (finish_in_float64 and route == "torch" and checkpoint is None
                         and torch.finfo(x.dtype).eps > torch.finfo(FINISH_DTYPE).eps
                         and all(isinstance(module, torch.nn.Module) for module in (model, guide)))
    if annealing is not None:
        loss.annealing = annealing
    return FitOptions(loss, batches, total_steps, route, optim, factory, lr, schedule, manage_lr, record_every,
                      eval_every, trace_elbo_every, trace_elbo_particles, checkpoint, checkpoint_every, data_variance,
                      tol, gtol, window, n_init, frozen, inner_steps, finish_in_float64)


def auto_route(loss, guide, full_batch, svi_settings=False, optim=None):
    """The route ``optimizer="auto"`` takes (see :func:`fit`): "lbfgs", "em", "rowwise" or "svi".

    :param bool full_batch: whether the steps see all the data (no ``batch_size``, or one >= N).
    :param bool svi_settings: whether a setting that only gradient routes read is given (``lr``,
        ``lr_schedule``, ``optim``).
    """
    closed_form = isinstance(loss, (EntropyELBO, AnalyticELBO))
    if closed_form and full_batch and not svi_settings and getattr(guide, "lbfgs_compatible", True):
        return "lbfgs"
    if closed_form and not full_batch and not svi_settings and covariance_family(guide) is not None:
        return "em"
    if closed_form and not full_batch and optim is None and offers_row_access(guide):
        return "rowwise"
    return "svi"


def _check_optimizer(optimizer, loss, batches, optim, svi_settings, guide):
    # Returns (route, the torch optimiser factory of the torch route or the EM options of the EM route, or None).
    closed_form = isinstance(loss, (EntropyELBO, AnalyticELBO))
    # A guide whose gradient is not its value's (pyro_esc.refinement.SemiAmortized) needs a first-order route.
    line_search_ok = getattr(guide, "lbfgs_compatible", True)
    if isinstance(optimizer, EM):
        optimizer, em = "em", optimizer
    else:
        em = EM()
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a torch.optim optimiser class "
                             f"(or factory params -> optimiser), got {optimizer!r}")
        if optimizer == "auto":
            optimizer = auto_route(loss, guide, batches.full, svi_settings, optim)
        if optimizer == "svi":
            return "svi", None
        if optimizer == "em":
            if not closed_form:
                raise ValueError(f"optimizer='em' needs a closed-form objective (EntropyELBO or AnalyticELBO); "
                                 f"{type(loss).__name__} samples: use optimizer='svi'")
            if covariance_family(guide) is None:
                raise ValueError(f"optimizer='em' solves per-point Gaussian guides (AutoNormal, "
                                 f"LocalMultivariateNormal); {type(guide).__name__} is neither: use "
                                 f"optimizer='lbfgs', 'rowwise' or 'svi'")
            if optim is not None:
                raise ValueError("optim (a pyro.optim optimiser) is for the SVI route; the EM route has none")
            return "em", em
        if optimizer == "rowwise":
            if batches.full:
                raise ValueError("optimizer='rowwise' takes minibatches (batch_size < N); for the full data "
                                 "use optimizer='lbfgs'")
            if not closed_form:
                raise ValueError(f"optimizer='rowwise' needs a closed-form objective (EntropyELBO or "
                                 f"AnalyticELBO); {type(loss).__name__} samples: use optimizer='svi'")
            if not offers_row_access(guide):
                raise ValueError(f"optimizer='rowwise' needs a per-point guide read row by row "
                                 f"(LocalMultivariateNormal, AutoNormal); {type(guide).__name__} is not one: "
                                 f"use optimizer='svi'")
            if optim is not None:
                raise ValueError("optim (a pyro.optim optimiser) is for the SVI route; the row-wise route uses "
                                 "its own Adam with lr")
            return "rowwise", None
        if not line_search_ok:
            raise ValueError(f"optimizer='lbfgs' cannot train a {type(guide).__name__}: its gradient is not the "
                             f"gradient of its objective's value, which a line search compares; use optimizer='svi'")
        if not batches.full:
            raise ValueError("optimizer='lbfgs' needs the full data set (batch_size=None): its line search "
                             "compares exact objective values, which a minibatch does not give")
        if not closed_form:
            raise ValueError(f"optimizer='lbfgs' needs a deterministic objective (EntropyELBO or AnalyticELBO); "
                             f"{type(loss).__name__} is sampled: use optimizer='svi'")
        factory = lbfgs
    elif callable(optimizer):
        factory = optimizer
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a torch.optim optimiser class "
                         f"(or factory params -> optimiser), got {optimizer!r}")
    if optim is not None:
        raise ValueError("optim (a pyro.optim optimiser) is for the SVI route; with a torch optimiser leave it "
                         "out, or pass optimizer='svi'")
    return "torch", factory


def _check_annealing(annealing, loss, total_steps, steps_per_epoch):
    if annealing is None:
        # A schedule given to the loss itself (EntropyELBO(annealing=...)) is checked the same way.
        annealing = getattr(loss, "annealing", None) if isinstance(loss, EntropyELBO) else None
        if annealing is None:
            return None
    if not isinstance(loss, EntropyELBO):
        raise ValueError(f"annealing weights the entropy terms of EntropyELBO; {type(loss).__name__} has none")
    if isinstance(annealing, str) and annealing == "default":
        annealing = Annealing.default(max(1, total_steps // 2))
    elif isinstance(annealing, str) and annealing == "authors":
        annealing = Annealing.authors(steps_per_epoch)
    if not isinstance(annealing, Annealing):
        raise ValueError(f"annealing must be an Annealing, 'default', 'authors' or None, got {annealing!r}")
    if loss.annealing is not None and loss.annealing is not annealing:
        raise ValueError(f"annealing: the loss already anneals with {loss.annealing!r} (from "
                         f"EntropyELBO(annealing=...) or an earlier fit); pass one schedule, in one place")
    return annealing


def _check_finishes(annealing, total_steps):
    if annealing.num_steps > total_steps:
        raise ValueError(f"annealing: {annealing!r} runs {annealing.num_steps} steps, but this run has "
                         f"{total_steps}; it would end on the annealed objective, not the ELBO. Pass at least "
                         f"{annealing.num_steps} steps (or the epochs for them), or a shorter schedule")


def _check_bounded(annealing, total_steps):
    # With beta_p > beta_q the weighted objective grows without bound as latents switch off (pyro_esc.annealing);
    # gradient routes stop partway, but the EM route's exact E- and M-steps climb it all the way (lambda -> 0).
    for step in range(min(total_steps, 100000)):
        beta_q, beta_p, _ = annealing.betas(step)
        if beta_p > beta_q * (1 + 1e-12):
            raise ValueError(f"annealing: {annealing!r} weights the prior entropy above the posterior's at step "
                             f"{step} (beta_p = {beta_p:g} > beta_q = {beta_q:g}); that objective grows without bound "
                             f"as latents switch off (pyro_esc.annealing), and the EM route's exact steps follow it "
                             f"to lambda -> 0. Use a schedule with beta_p <= beta_q (e.g. annealing='default'), or a "
                             f"gradient route (optimizer='rowwise' or 'svi')")


def fit(model, guide, data, loss=None, *, optimizer="auto", steps=None, epochs=None, batch_size=None, lr=None,
        lr_schedule=None, optim=None, tol="auto", gtol="auto", window=DEFAULT_WINDOW, n_init=1, seed=0,
        device=None, dtype=None, progress=True, record_every=1, eval_every=None, trace_elbo_every=None,
        trace_elbo_particles=16, checkpoint=None, checkpoint_every=None, resume=None, callback=None,
        annealing=None, train_dictionary=True, inner_steps=None, train_model=True, finish_in_float64=True):
    """Train ``model`` and ``guide`` on ``data``; return a :class:`~pyro_esc.History`.

    **Four routes**, chosen by ``optimizer`` (``History.route`` says which ran):

    - ``"lbfgs"``: torch's L-BFGS with a strong-Wolfe line search on the exact,
      full-batch objective, one L-BFGS iteration per step, until the convergence
      test holds (``tol``, ``gtol``, ``window``) or ``steps`` run out. Any
      ``torch.optim`` optimiser class, or a factory ``params -> optimiser`` such
      as ``functools.partial(torch.optim.Adam, lr=0.01)``, takes the same route
      (:class:`~pyro_esc.steppers.TorchStep`): it optimises the parameters that
      the objective reads, found through Pyro's param store as SVI finds them.
    - ``"svi"``: one ``SVI.step`` per step with ``optim`` (a ``pyro.optim``
      optimiser, default Adam(``lr``)): for minibatches (``batch_size``) and
      sampled objectives such as ``Trace_ELBO``. Minibatches are indices passed
      to model and guide as ``subsample=...`` (Pyro's idiom), a fresh random
      permutation per epoch.
    - ``"rowwise"``: minibatch steps that cost O(batch) for a closed-form
      objective and a per-point guide (:class:`~pyro_esc.rowwise.RowwiseStep`):
      only the batch's rows of the guide's per-point parameters are read and
      updated, by Adam with its state kept per row (a point's posterior moves
      only when its point is in the batch), the global parameters by Adam
      (``lr``, ``lr_schedule``); ``inner_steps`` > 1 updates the batch's rows
      that many times per step, all but the last with the dictionary fixed.
    - ``"em"`` (or :class:`~pyro_esc.em.EM` for its options): variational EM for a
      closed-form objective and a per-point Gaussian guide (``AutoNormal``,
      :class:`~pyro_esc.LocalMultivariateNormal`), on the full data or on
      minibatches (:mod:`pyro_esc.em`): each step solves its batch's posteriors
      exactly (:func:`~pyro_esc.solver.solve_posteriors`); after every
      ``EM(chunk=...)`` points the dictionary is set in closed form from their
      sufficient statistics, with a heavy-ball extrapolation (``momentum``), and
      lambda*, sigma^2* with it. The last step solves every point's posterior at
      the final model. No learning rate.
    - ``"auto"`` (default): ``"lbfgs"`` for a closed-form objective on the full
      data, unless an SVI setting (``optim``, ``lr`` or ``lr_schedule``) is
      given; ``"em"`` for a closed-form objective on minibatches with
      ``AutoNormal`` or ``LocalMultivariateNormal`` unless such a setting is given;
      ``"rowwise"`` for a closed-form objective on minibatches with another guide
      that offers row access (or with ``lr``/``lr_schedule``) unless ``optim``
      is given; else ``"svi"`` (:func:`auto_route`).

    With :class:`~pyro_esc.EntropyELBO` (the default loss) each step is
    followed by ``loss.update(...)``, which writes lambda*, sigma^2* of the
    parameters after the step into the model and keeps minibatch statistics
    current (on the row-wise route, ``loss.update_scales``: the step itself
    stored the batch's statistics, as evaluated before its update).

    **Units**: on the torch route with a per-point Gaussian guide (``AutoNormal``,
    :class:`~pyro_esc.LocalMultivariateNormal`) and a :class:`~pyro_esc.SparseCoding`, data far from the
    scale the route's defaults were measured at are divided by a power of two that brings them within a
    factor sqrt(2) of it, with the model and guide rescaled into those units and back (exactly: the model
    is scale-equivariant); so data times 2^k give the very same run and data in other units the same
    result where the problem has a clear optimum (:mod:`pyro_esc.standard_units`; ``History.unit``).
    The EM route is unit-free by construction.

    **Convergence**: with ``tol`` the run stops once the exact objective per
    data point changed by at most ``tol`` (relative) over the last ``window``
    steps and, with ``gtol``, the gradient norm of the per-point loss is at most
    ``gtol`` (:class:`~pyro_esc.convergence.Convergence`). On the torch route a
    run also stops when it stalls: a step that finds no decrease at all resets
    the optimiser's memory, and a second one in a row ends the run
    (``History.converged`` is then False, and ``stop_reason`` says "stalled").
    ``History.converged`` and ``History.stop_reason`` say how the run ended; a
    run that reaches its step limit unconverged, or stalls, also issues a
    :class:`ConvergenceWarning`, as does a model that ends up explaining none of
    the data's variance.

    **Restarts**: ``n_init=k`` trains from k initialisations (seeds ``seed``,
    ``seed + 1``, ...; see :mod:`pyro_esc.restarts` for what differs) and keeps
    the one with the best exact final ELBO; ``History.restart_elbos`` holds all k.

    What is recorded (see :class:`~pyro_esc.History`): the objective at every
    ``record_every``-th step (``History.elbo``, ``History.elbo_kind`` saying
    whether it is exact or an estimate), and the exact full-data ELBO every
    ``eval_every`` steps and after the last (``History.final_elbo`` is the
    number to report).

    :param model: a :class:`~pyro_esc.SparseCoding` (or any Pyro model taking ``(x, subsample=None)``).
    :param guide: a guide for it.
    :param data: the data, (N, D): a tensor (keeps its dtype) or an array (converted to ``dtype``).
        Constant data (every point the same) is rejected: its ELBO is unbounded.
    :param loss: a ``pyro.infer.ELBO``; default ``EntropyELBO()``.
    :param optimizer: ``"auto"``, ``"lbfgs"``, ``"svi"``, ``"rowwise"``, ``"em"``, an
        :class:`~pyro_esc.em.EM`, or a torch optimiser class or factory.
    :param int steps: the step limit (default: 20000 on the torch route and full-batch EM, which stop on
        convergence; 1000 on the others).
    :param int epochs: alternatively, passes over the data (ceil(N / batch_size) steps each).
    :param int batch_size: minibatch size; None for full batch.
    :param float lr: Adam's learning rate on the SVI route (default 0.05) and the row-wise route
        (default 0.4, rows and dictionary alike).
    :param lr_schedule: SVI and row-wise routes: None/'constant', 'cosine' (to 0.1 lr), 'exponential'
        (to 0.1 lr) or a callable f(progress in [0, 1]) -> factor on ``lr``.
    :param optim: SVI route: a ``pyro.optim.PyroOptim`` to use instead of Adam(lr) (then ``lr``
        only feeds the schedule, if any).
    :param float tol: relative change of the objective over ``window`` steps that counts as
        converged; ``"auto"``: 1e-7 on the torch route and full-batch EM, None (run every step) on the
        SVI and row-wise routes and minibatch EM.
    :param float gtol: bound on the per-point gradient norm for convergence (torch route); None
        for no gradient test.
    :param int window: steps over which the change is measured.
    :param int n_init: number of initialisations; the best exact ELBO is kept.
    :param int seed: seeds Pyro's RNG and the minibatch order (restart i uses ``seed + i``); an integer >= 0.
    :param device: move data, model and guide there (default: the data's device); an unavailable CUDA
        device or ``"meta"`` is refused before training.
    :param dtype: dtype for array data (default torch's default dtype): float32 or float64. float16 and
        bfloat16 (as data or as ``dtype``) are refused: the objective's sums need float32's resolution.
    :param bool progress: show a tqdm progress bar with the objective, lambda and sigma^2.
    :param int record_every: record the history every this many steps (and at the last).
    :param int eval_every: record the exact full-data ELBO every this many steps (and after the
        last); default: once per epoch for minibatches, after the last step for full batch.
    :param int trace_elbo_every: every this many recorded steps also record a Monte Carlo estimate
        of the ELBO per data point with Pyro's ``Trace_ELBO`` (vectorised particles) on the full data.
    :param int trace_elbo_particles: particles for that estimate.
    :param str checkpoint: path to save a checkpoint to, every ``checkpoint_every`` steps and at the end
        (where the run trains in standard units, see **Units**, the model and guide in it are in those units;
        ``resume`` returns them in the data's own).
    :param int checkpoint_every: see ``checkpoint``.
    :param str resume: path of a checkpoint to continue from; ``steps``/``epochs`` are the total.
    :param callback: optional ``callback(step, history)``, called after each recorded step.
    :param annealing: entropy annealing for an :class:`~pyro_esc.EntropyELBO` loss: an
        :class:`~pyro_esc.annealing.Annealing`, or ``"default"`` for
        :meth:`~pyro_esc.annealing.Annealing.default` over the first half of the steps (the true
        objective after), or ``"authors"`` for :meth:`~pyro_esc.annealing.Annealing.authors` (beta_p
        10 -> 1 stepwise over the first five epochs). Equivalent to ``loss=EntropyELBO(annealing=...)``; fit sets the weights
        before every step (``EntropyELBO.set_annealing_step``) and records them in ``History.betas``.
        A schedule longer than the run is refused (the run would end on the annealed objective). When the
        convergence test holds (or the line search stalls in float64) before the schedule has ended, the
        optimiser is at rest on the annealed objective: the schedule is cut there and the run goes on with
        the true objective until its own test holds (``History.annealing_cut``).
    :param bool train_dictionary: False keeps the dictionary fixed and fits only the guide (torch or
        row-wise route), as :func:`~pyro_esc.evaluation.reference_elbo` does.
    :param bool train_model: False keeps every model parameter fixed (dictionary, and lambda, sigma^2
        for AnalyticELBO, which would otherwise learn them) and fits only the guide, as
        :func:`~pyro_esc.encode` does for new data.
    :param int inner_steps: row-wise route: updates of the batch's posterior rows per step (default
        :data:`ROWWISE_INNER_STEPS`; README, "Paper scale").
    :param bool finish_in_float64: torch route, data in a lower precision than float64 (float32): when
        the line search stalls (no lower value twice in a row: the steps have reached the objective's
        resolution, not the optimum), continue the run in float64 until the convergence test holds
        or the steps run out, then return the model and guide in their own dtype
        (``History.finish_step`` says where float64 took over). Needs model and guide to be
        ``torch.nn.Module`` s (to convert them) and no ``checkpoint``; otherwise the run stops there,
        as with False.
    :raises NonFiniteObjectiveError: if the objective or a parameter becomes NaN or inf, or the
        noise variance collapses; the message says at which step and which term.
    """
    check_owns_its_parameters(model, guide)
    x = _prepare_data(data, device, dtype)
    options = check_fit_options(
        model, guide, x, loss, optimizer=optimizer, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
        lr_schedule=lr_schedule, optim=optim, seed=seed, record_every=record_every, eval_every=eval_every,
        trace_elbo_every=trace_elbo_every, trace_elbo_particles=trace_elbo_particles, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, resume=resume, annealing=annealing, tol=tol, gtol=gtol, window=window,
        n_init=n_init, train_dictionary=train_dictionary, inner_steps=inner_steps, train_model=train_model,
        finish_in_float64=finish_in_float64)
    # From here on a per-point guide's posteriors are those of x (evaluations on other data are refused).
    tie_to_data(guide, x)
    for module in (model, guide):
        if isinstance(module, torch.nn.Module):
            module.to(x.device)
    unit = data_unit(x) if trains_in_standard_units(options.route, model, guide) else 1.0
    if unit != 1.0:
        # L-BFGS's path depends on the data's units: it runs on the data brought by a power of two into the
        # range its defaults were measured in (the model is scale-equivariant and the guide's rows rescale
        # exactly); see pyro_esc.standard_units.
        standard = replace(options, unit=unit, data_variance=options.data_variance / unit ** 2)
        with in_standard_units(model, guide, unit):
            history = _fit_restarts(model, guide, x / unit, standard, int(seed), progress, callback, resume)
    else:
        history = _fit_restarts(model, guide, x, options, int(seed), progress, callback, resume)
    _warn_if_nothing_explained(model, options)
    return history


def _fit_restarts(model, guide, x, options, seed, progress, callback, resume):
    """``options.n_init`` runs from seeds ``seed``, ``seed + 1``, ...; the best final ELBO is kept."""
    if options.n_init == 1:
        return _fit_run(model, guide, x, options, seed, progress, callback, resume)[0]
    best, best_state, elbos, names = None, None, [], None
    for restart in range(options.n_init):
        if restart > 0:
            reinitialize(model, guide, names, seed + restart)
        history, stepper = _fit_run(model, guide, x, options, seed + restart, progress, callback, None)
        names = stepper.names
        elbos.append(history.final_elbo)
        if best is None or history.final_elbo > best.final_elbo:
            best, best_state = history, snapshot(names, model, guide)
            best.best_restart = restart
    restore(best_state, model, guide)
    best.restart_elbos = elbos
    return best


def _warn_if_nothing_explained(model, options):
    # sigma^2 at the data's variance: the codes explain no more than the data's mean would. The run may well
    # have converged, to the all-zero code: with the posteriors at a scale far from the data's (data in other
    # units than the guide's initial scale assumes), that point attracts the L-BFGS route.
    noise_var = getattr(model, "noise_var", None)
    if "raw_dictionary" in options.frozen or not isinstance(noise_var, torch.Tensor) or noise_var.numel() != 1:
        return
    if float(noise_var.detach()) >= (1 - NOTHING_EXPLAINED) * options.data_variance:
        warnings.warn(f"fit: the model explains none of the data's variance (sigma^2 = "
                      f"{float(noise_var.detach()):.3g}, the data's variance per dimension "
                      f"{options.data_variance:.3g}): the codes are all near 0. If the "
                      f"data are in unusual units, standardise them (divide by their standard deviation) or pass "
                      f"the guide an init_scale of their scale; with a per-point Gaussian guide, optimizer='em' "
                      f"does not depend on the units", ConvergenceWarning, stacklevel=3)


def _fit_run(model, guide, x, options, seed, progress, callback, resume):
    """One run: :func:`_fit_once`, continued in float64 where a lower precision stalled it.

    The torch route stalls when its line search finds no lower value twice in a row, which in
    float32 happens once steps change the objective by less than its resolution (about 1e-7
    relative), often long before the convergence test holds: the slow directions of the bars
    problems are still being followed there. With ``options.finish_in_float64`` the model, guide
    and data are then converted to float64, the run continues from the same parameters (its step
    count, annealing schedule and History go on; the curvature memory starts afresh) until the
    convergence test holds or the steps run out, and the model and guide are converted back, so
    the caller's dtype is unchanged. ``History.finish_step`` records where float64 took over, and
    the final ELBO is evaluated again at the returned parameters.
    """
    history, stepper = _fit_once(model, guide, x, options, seed, progress, callback, resume)
    if not (options.finish_in_float64 and history.stop_reason.startswith("stalled")
            and history.step and history.step[-1] < options.total_steps):
        _warn_if_stalled(history)
        return history, stepper
    dtype, stalled_at = x.dtype, history.step[-1]
    model.to(FINISH_DTYPE)
    guide.to(FINISH_DTYPE)
    try:
        history, stepper = _fit_once(model, guide, x.to(FINISH_DTYPE), options, seed, progress, callback, None,
                                     continue_from=history)
    finally:
        model.to(dtype)
        guide.to(dtype)
    history.finish_step = stalled_at
    history.stop_reason += f" (in float64 from step {stalled_at}, where {_dtype_name(dtype)} stalled)"
    # The parameters returned are the float64 ones rounded to the caller's dtype: report their ELBO, and
    # write the scales of exactly these parameters.
    elbo, history.eval_kind = _exact_elbo(model, guide, x, options.loss)
    history.eval_elbo[-1] = history.in_data_units(elbo)
    if isinstance(options.loss, EntropyELBO):
        options.loss.update(model, guide, x)
    _warn_if_stalled(history)
    return history, stepper


def _warn_if_stalled(history):
    # A stall ends the run where the line search finds no decrease: not an optimum the convergence test
    # confirmed. Say so where the user sees it, with the gradient left.
    if history.stop_reason.startswith("stalled"):
        gradient = history.grad_norm[-1] if history.grad_norm else math.nan
        warnings.warn(f"fit: the run stalled at step {history.step[-1]} with gradient norm {gradient:.2g}, before "
                      f"the convergence test held: the result is not a confirmed optimum. If the data are in "
                      f"unusual units, standardise them (divide by their standard deviation); with a per-point "
                      f"Gaussian guide, optimizer='em' solves the posteriors exactly", ConvergenceWarning,
                      stacklevel=5)  # _fit_run -> _fit_restarts -> fit -> the caller's line


def _fit_once(model, guide, x, options, seed, progress, callback, resume, continue_from=None):
    """One training run (see :func:`fit`); returns its History and the route's stepper.

    :param History continue_from: the History of a run to go on with (its last step, wall time and
        records), from the current parameters with a fresh optimiser; see :func:`_fit_run`.
    """
    loss, batches, total_steps = options.loss, options.batches, options.total_steps
    history = History(num_data=x.size(0), elbo_kind=options.elbo_kind, route=options.route, unit=options.unit,
                      data_dim=x.size(1))
    batches.reset(seed)
    start_step, elapsed, state = 0, 0.0, None
    # What identifies the data in a checkpoint: one pass over x, once per run.
    fingerprint = data_fingerprint(x) if options.checkpoint is not None or resume is not None else None
    if resume is not None:
        state = restore_checkpoint(resume, model, guide, loss, batches, x, options.route, fingerprint)
        start_step, elapsed, history = state["step"], state["wall_time"], History.from_dict(state["history"])
    elif continue_from is not None:
        start_step, elapsed, history = continue_from.step[-1], continue_from.wall_time[-1], continue_from
    else:
        pyro.set_rng_seed(seed)
    stepper = options.make_step(model, guide, x)
    if state is not None:
        stepper.load_state_dict(state["optim"])
    history.optimizer = stepper.name
    convergence = None if options.tol is None else Convergence(options.tol, options.gtol, options.window)
    annealing = getattr(loss, "annealing", None) if isinstance(loss, EntropyELBO) else None

    def save(step):
        save_checkpoint(options.checkpoint, step, model, guide, stepper.state_dict(), loss, batches, history,
                        time.perf_counter() - started, x, options.route, fingerprint)

    bar = tqdm(total=total_steps, initial=start_step, disable=not progress, desc="fit", dynamic_ncols=True)
    started = time.perf_counter() - elapsed
    step, previous, stalls, stalled = start_step, None, 0, None
    try:
        for step in range(start_step + 1, total_steps + 1):
            if options.manage_lr:
                stepper.set_lr(options.lr * _check_lr_factor(options.schedule, (step - 1) / max(1, total_steps - 1)))
            subsample = batches.next()
            kwargs = {} if subsample is None else {"subsample": subsample.to(x.device)}
            annealing_step = step - 1 if history.annealing_cut is None else max(step - 1, annealing.num_steps)
            value, grad_norm = training_step(stepper, model, guide, x, kwargs, step, options, annealing_step)
            done = convergence is not None and history.elbo_kind == EXACT and convergence.update(-value / x.size(0),
                                                                                                 grad_norm)
            if stepper.route == "torch" and value == previous:
                # No decrease at all: the line search found no lower value along the current direction.
                # Once, forget the curvature memory and try steepest descent; twice in a row, stop.
                stalls += 1
                stepper.reset()
                if stalls >= 2:
                    stalled = (f"stalled: the line search found no decrease in two successive steps, the second "
                               f"from steepest descent (gradient norm {grad_norm:.2g}; in {_dtype_name(x.dtype)} "
                               f"the objective is resolved to about {torch.finfo(x.dtype).eps:.0e} relative)")
                    done = True
            else:
                stalls = 0
            previous = value
            handed_to_float64 = stalled is not None and options.finish_in_float64 and x.dtype != FINISH_DTYPE
            if done and annealing is not None and annealing_step < annealing.num_steps and not handed_to_float64:
                # Converged (or stalled, in float64) on the annealed objective before the schedule ended: the rest
                # of the schedule would only move the weights under a resting optimiser. Cut it here and go on
                # with the true objective, so that the run ends where the convergence test holds for the ELBO.
                # (A float32 stall first goes on in float64 with the schedule, see _fit_run.)
                history.annealing_cut, done, stalls, stalled, previous = step, False, 0, None, None
                convergence = Convergence(options.tol, options.gtol, options.window)
                stepper.reset()
            last = done or step == total_steps
            if step % options.record_every == 0 or last:
                history.record(step, step / batches.steps_per_epoch, value, model, stepper.current_lr(),
                               getattr(loss, "betas", (1.0, 1.0, 1.0)), time.perf_counter() - started, grad_norm)
                if options.trace_elbo_every is not None and (step % options.trace_elbo_every == 0 or last):
                    history.trace_elbo_step.append(step)
                    history.trace_elbo.append(history.in_data_units(_trace_elbo(model, guide, x,
                                                                                options.trace_elbo_particles)))
                if progress:
                    bar.set_postfix(history.progress_postfix(), refresh=False)
            if last and hasattr(stepper, "finish"):
                if options.checkpoint is not None:
                    # What a continued run resumes from: the state before the final E-step below.
                    save(step)
                # The EM route's last E-step: every point's posterior at the final model.
                stepper.finish(x)
            if last or options.eval_due(step):
                elbo, history.eval_kind = _exact_elbo(model, guide, x, loss)
                history.eval_step.append(step)
                history.eval_elbo.append(history.in_data_units(elbo))
            if callback is not None and history.step and history.step[-1] == step:
                callback(step, history)
            bar.update(1)
            if done:
                break
            if options.checkpoint_every is not None and step % options.checkpoint_every == 0 and step != total_steps:
                _check_parameters_finite(step)
                save(step)
    finally:
        bar.close()
    _check_parameters_finite(step)
    history.evaluations += stepper.evaluations
    history.converged = convergence is not None and convergence.reason is not None
    if history.converged:
        history.stop_reason = convergence.reason
    elif stalled is not None:
        history.stop_reason = stalled
    else:
        history.stop_reason = f"step limit: {step} steps"
        if convergence is not None:
            history.stop_reason += f" without meeting tol={options.tol:g} (unconverged)"
            # _fit_once -> _fit_run -> _fit_restarts -> fit: the warning names the caller's line.
            warnings.warn(f"fit: {history.stop_reason}; pass more steps, or a larger tol", ConvergenceWarning,
                          stacklevel=5)
    if history.annealing_cut is not None and "annealing cut" not in history.stop_reason:
        history.stop_reason += (f" (annealing cut at step {history.annealing_cut}, where the run had come to rest on "
                                f"the annealed objective; the true objective from there)")
    if options.checkpoint is not None and not hasattr(stepper, "finish"):
        save(step)
    return history, stepper


def training_step(stepper, model, guide, x, kwargs, step, options, annealing_step=None):
    """One training step on the route's stepper, then the explicit post-step update of an EntropyELBO.

    :param int annealing_step: the completed steps the annealing weights are read at (default ``step - 1``;
        past the schedule's end once :func:`fit` has cut it, ``History.annealing_cut``).
    :returns: ``(value, grad_norm)``: the objective to record (a loss, -N ELBO) and the gradient
        norm of the per-point loss if the route knows it (else None). For EntropyELBO the value is
        the one after the step (exact on the full data; the running estimate on a minibatch); for
        other closed-form objectives on the torch route too; on the SVI route the value the step
        evaluated.
    :raises NonFiniteObjectiveError: naming the step and the term or site.
    """
    loss = options.loss
    if isinstance(loss, EntropyELBO):
        loss.set_annealing_step(step - 1 if annealing_step is None else annealing_step)
    try:
        value, grad_norm = stepper.step(x, kwargs)
        if stepper.route == "em":
            # The M-step set lambda*, sigma^2* (and W) itself, from the chunk's statistics.
            noise_var = float(model.noise_var.detach())
            if noise_var < NOISE_COLLAPSE * options.data_variance:
                raise NonFiniteObjectiveError(
                    f"the noise variance sigma^2* collapsed to {noise_var:g} (data variance "
                    f"{options.data_variance:g}): the model reproduces the data exactly (data of rank < H?), "
                    f"and the ELBO grows without bound")
        elif isinstance(loss, EntropyELBO):
            if stepper.route == "rowwise":
                # The row-wise step stored the batch's rows itself (O(batch)); only the scales are left to write.
                terms = loss.update_scales(model, guide, x)
            else:
                # L-BFGS has (nearly always) just evaluated the point it stopped at: write those terms.
                evaluated = stepper.current_terms() if stepper.route == "torch" and not kwargs else None
                terms = (loss.update(model, guide, x, **kwargs) if evaluated is None
                         else loss.update_scales(model, guide, x, terms=evaluated))
            value = float(-terms.num_data * terms.elbo)
            if float(terms.noise_var) < NOISE_COLLAPSE * options.data_variance:
                raise NonFiniteObjectiveError(
                    f"the noise variance sigma^2* collapsed to {float(terms.noise_var):g} (data variance "
                    f"{options.data_variance:g}): the model reproduces the data exactly (data of rank < H?), "
                    f"and the ELBO grows without bound")
        elif stepper.route == "torch":
            value = loss.loss(model, guide, x, **kwargs)
    except NonFiniteObjectiveError as error:
        raise NonFiniteObjectiveError(f"step {step}: {error}") from error
    except ValueError as error:
        # Pyro's distribution validation fails first when a parameter is NaN.
        if _non_finite_parameters():
            raise NonFiniteObjectiveError(
                f"step {step}: {type(loss).__name__} failed ({error.args[0].splitlines()[0]}); "
                f"{_diagnose_non_finite(model, guide, x, kwargs)}") from error
        raise
    if not math.isfinite(value) or (grad_norm is not None and not math.isfinite(grad_norm)):
        raise NonFiniteObjectiveError(
            f"step {step}: {type(loss).__name__} loss is {value} (gradient norm {grad_norm}); "
            f"{_diagnose_non_finite(model, guide, x, kwargs)}")
    return value, grad_norm


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _exact_elbo(model, guide, x, loss):
    """The full-data ELBO per data point and its kind, without changing anything.

    Closed-form objectives evaluate themselves; under a sampled objective a
    Gaussian guide is evaluated in closed form (AnalyticELBO at the model's
    scales), any other guide by the objective's own Monte Carlo estimate.
    """
    if isinstance(loss, EntropyELBO):
        return entropy_elbo_per_point(model, guide, x), EXACT
    try:
        return analytic_elbo_per_point(model, guide, x), EXACT
    except ValueError:
        if isinstance(loss, AnalyticELBO):
            raise
    with torch.no_grad(), poutine.block():
        return -loss.loss(model, guide, x) / x.size(0), MONTE_CARLO


def decaying_adam(lr, steps, decay_to=0.2, betas=(0.9, 0.99), clip_norm=10.0, lr_for=None):
    """Pyro's ClippedAdam with the learning rate decaying geometrically to ``lr * decay_to`` over ``steps``.

    The recipe the bars benchmark was tuned with (benchmarks/bars_recovery.py):
    a high initial rate to move away from the initial dictionary fast, decay
    to settle, gradient-norm clipping against the occasional large step, and
    beta_2 = 0.99 so that the second-moment estimate follows the shrinking
    gradients of the posteriors. Pass it to :func:`fit` as ``optim``.

    :param float lr: initial learning rate.
    :param int steps: number of steps over which the rate decays.
    :param callable lr_for: optional ``lr_for(param_name)`` returning a different initial
        rate for some parameters (e.g. an encoder's), or None for ``lr``.
    """
    lr = check_positive(lr, "lr")
    steps = check_int(steps, "steps")
    decay = check_positive(decay_to, "decay_to") ** (1.0 / steps)

    def options(name, _):
        # Called when the optimiser first meets a parameter (after lazy setup).
        rate = lr if lr_for is None or lr_for(name) is None else lr_for(name)
        return {"lr": rate, "lrd": decay, "betas": tuple(betas), "clip_norm": clip_norm}

    return pyro.optim.ClippedAdam(options)


#: Initial learning rate of the encoders of amortised guides (an MLP's output moves by about
#: lr x fan-in per Adam step, so it needs a smaller rate than per-point parameters).
AMORTIZED_LR = 0.003


def bars_optimizer(guide_object, steps, lr=0.2):
    """The tuned bars recipe: :func:`decaying_adam`, encoders at :data:`AMORTIZED_LR`."""
    prefix = module_name(guide_object) + "." if isinstance(guide_object, AmortizedNormal) else None
    return decaying_adam(lr, steps, lr_for=lambda name: AMORTIZED_LR if prefix and name.startswith(prefix) else None)


#: The dtypes fit trains in. float16 and bfloat16 resolve about 3 significant digits: the ELBO's sums lose
#: whole nats (bfloat16 bars: -18.720 where float64 gives -18.852 at the same parameters) and torch's L-BFGS
#: divides by zero.
TRAINING_DTYPES = (torch.float32, torch.float64)


def _prepare_data(data, device, dtype):
    if dtype is not None and dtype not in TRAINING_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}: the closed-form sums and "
                         f"L-BFGS need at least float32's resolution")
    device = check_device(device)
    is_array = not isinstance(data, torch.Tensor)
    x = check_data(data, "data", allow_numpy=True)
    if is_array:
        x = x.to(dtype or torch.get_default_dtype())
    elif dtype is not None:
        x = x.to(dtype)
    if x.dtype not in TRAINING_DTYPES:
        raise ValueError(f"data has dtype {x.dtype}, which resolves too few digits for the ELBO's sums (and "
                         f"torch's L-BFGS); pass data.float() or dtype=torch.float32 (or float64)")
    if device is not None:
        x = x.to(device)
    return check_magnitude(x, "data")


def _total_steps(steps, epochs, steps_per_epoch):
    if steps is not None and epochs is not None:
        raise ValueError("pass steps or epochs, not both")
    if epochs is not None:
        return check_int(epochs, "epochs") * steps_per_epoch
    return 1000 if steps is None else check_int(steps, "steps")


def _check_subsampling(guide, loss, batches):
    # A sampled objective replays the guide's plate indices into the model; an
    # autoguide without create_plates draws its own random ones and would
    # silently pair the wrong z with each x.
    if batches.full or isinstance(loss, (EntropyELBO, AnalyticELBO)):
        return
    if isinstance(guide, AutoGuide) and guide.create_plates is None:
        raise ValueError(f"minibatches with {type(loss).__name__} and {type(guide).__name__} need the guide to "
                         f"share the model's plate: build it as {type(guide).__name__}(model, "
                         f"create_plates=model.create_plates)")


def _trace_elbo(model, guide, x, particles):
    # Monte Carlo, so that a closed-form objective can be checked against Pyro's own estimator.
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad(), poutine.block():
        return -elbo.loss(model, guide, x) / x.size(0)


def _diagnose_non_finite(model, guide, x, kwargs):
    """Name the sites and parameters that are not finite (for the error message)."""
    problems = [f"parameter {name!r}" for name in _non_finite_parameters()]
    try:
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
        for where, trace in (("guide", guide_trace), ("model", model_trace)):
            trace.compute_log_prob()
            problems += [f"{where} site {name!r} log-probability" for name, site in trace.nodes.items()
                         if site["type"] == "sample" and "log_prob_sum" in site
                         and not bool(torch.isfinite(site["log_prob_sum"]))]
    except Exception as error:  # noqa: BLE001 - diagnosis must not hide the original problem
        problems.append(f"(the traces could not be computed: {str(error).splitlines()[0]})")
    return "non-finite: " + (", ".join(problems) if problems else "no single site or parameter (the sum overflowed)")


def _non_finite_parameters():
    return [name for name, value in pyro.get_param_store().named_parameters()
            if not bool(torch.isfinite(value).all())]


def _check_parameters_finite(step):
    bad = _non_finite_parameters()
    if bad:
        raise NonFiniteObjectiveError(f"step {step}: parameters became non-finite: {', '.join(bad)}")


