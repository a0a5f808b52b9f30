"""What :func:`~pyro_esc.fit` is asked to do, validated once: :func:`check_fit_options` returns the one
:class:`FitOptions` that the loop (:mod:`pyro_esc.train.loop`) reads.

Every argument of ``fit`` is checked here, before anything trains, and a bad one raises a
ValueError that names it. The route is chosen here too (:func:`auto_route`): ``"lbfgs"`` (the torch
route) on the full data with a closed-form objective, ``"em"`` or ``"rowwise"`` on minibatches with a
per-point guide, ``"svi"`` otherwise; :meth:`FitOptions.make_step` builds the route's stepper.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import pyro
from pyro.infer.autoguide import AutoGuide

from .._checks import check_data, check_device, check_int, check_magnitude, check_positive
from ..infer.annealing import Annealing
from ..infer.objectives import AnalyticELBO, EntropyELBO
from ..models.sparse_coding import MODEL_PARAMETERS
from ..variational.guides import covariance_family
from ..variational.rows import offers_row_access
from .convergence import Convergence
from .em import EM, EMStep
from .history import BATCH, CHUNK, EXACT, MONTE_CARLO, RUNNING
from .restarts import check_restartable
from .rowwise import RowwiseStep
from .steppers import SVIStep, TorchStep, lbfgs


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
#: batch's posteriors per step (chosen by benchmarks/minibatch_route.py; BENCHMARKS.md, "The row-wise route").
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

    def init_statistics(self, model, guide, x):
        """The running minibatch statistics this run keeps (:meth:`~pyro_esc.EntropyELBO.init_statistics`),
        or None: on the full data, on the EM route (whose sufficient statistics are its stepper's) and for
        other objectives."""
        if self.batches.full or self.route == "em" or not isinstance(self.loss, EntropyELBO):
            return None
        return self.loss.init_statistics(model, guide, x)

    @property
    def route_name(self):
        """The route as :class:`~pyro_esc.History` reports it: the name ``fit(optimizer=...)`` takes, so
        ``"lbfgs"`` for the torch route with L-BFGS (``"torch"`` for another torch optimiser)."""
        return "lbfgs" if self.route == "torch" and self.optimizer is lbfgs else self.route

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


def check_fit_options(model, guide, x, *, loss, optimizer, steps, epochs, batch_size, lr, lr_schedule, optim, seed,
                      record_every, eval_every, trace_elbo_every, trace_elbo_particles, checkpoint, checkpoint_every,
                      resume, annealing, tol, gtol, window, n_init, train_dictionary, inner_steps, train_model,
                      finish_in_float64):
    """Validate :func:`fit`'s arguments once, before anything trains; return :class:`FitOptions`.

    Takes every option as :func:`fit` received it (fit's signature holds the defaults; a
    missing or unknown one is a TypeError here). Raises a ValueError naming the argument.
    Sets ``annealing`` on the loss only once every argument has passed.
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
