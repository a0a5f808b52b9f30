"""The training loop: :func:`fit` runs SVI and records what happened.

One function owns the loop so that every experiment, notebook and the command
line train the same way: steps or epochs, minibatches, learning rate and its
schedule, a seed, the device, a progress bar, a :class:`~pyro_esc.History`,
checkpoints that resume bit-for-bit on CPU (:mod:`pyro_esc.checkpoint`), and a
clear stop when anything turns non-finite.

``fit`` is three parts: :func:`check_fit_options` validates every argument once,
before training; :func:`training_step` is one step (the SVI update, then, for
:class:`~pyro_esc.EntropyELBO`, the explicit ``update`` that writes lambda*,
sigma^2* into the model); :class:`~pyro_esc.History` records.
"""

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

import pyro
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoGuide

from ._checks import check_data, check_int, check_positive
from .annealing import Annealing
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, restore_checkpoint, save_checkpoint  # noqa: F401
from .evaluation import held_out_elbo, training_elbo
from .history import BATCH, EXACT, MONTE_CARLO, RUNNING, History
from .objectives import AnalyticELBO, EntropyELBO, NonFiniteObjectiveError

#: sigma^2* below this fraction of the data's mean variance means the model fits the data exactly
#: (e.g. constant data, or data of rank < H): the ELBO then grows without bound.
NOISE_COLLAPSE = 1e-10


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

    def state_dict(self):
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


@dataclass
class FitOptions:
    """Every argument of :func:`fit`, validated (see :func:`check_fit_options`)."""

    loss: object
    batches: "_Batches"
    total_steps: int
    optim: object
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

    @property
    def elbo_kind(self):
        """What the per-step objective is (see :class:`~pyro_esc.History`)."""
        if not isinstance(self.loss, (EntropyELBO, AnalyticELBO)):
            return MONTE_CARLO
        if self.batches.full:
            return EXACT
        running = isinstance(self.loss, EntropyELBO) and self.loss.minibatch_statistics == "running"
        return RUNNING if running else BATCH

    def eval_due(self, step):
        """Whether to record the exact full-data ELBO after ``step`` (always after the last)."""
        return step == self.total_steps or (self.eval_every is not None and step % self.eval_every == 0)


def check_fit_options(model, guide, x, loss=None, *, steps=None, epochs=None, batch_size=None, lr=0.05,
                      lr_schedule=None, optim=None, seed=0, record_every=1, eval_every=None,
                      trace_elbo_every=None, trace_elbo_particles=16, checkpoint=None, checkpoint_every=None,
                      annealing=None):
    """Validate :func:`fit`'s arguments once, before anything trains; return :class:`FitOptions`.

    Raises a ValueError naming the argument. Sets ``annealing`` on the loss only
    once every argument has passed.
    """
    loss = EntropyELBO() if loss is None else loss
    if not isinstance(loss, pyro.infer.ELBO):
        raise ValueError(f"loss must be a pyro.infer.ELBO (e.g. EntropyELBO()), got {loss!r}")
    data_variance = float(x.var(0, unbiased=False).mean()) if x.size(0) > 1 else 0.0
    if not data_variance > 0:
        raise ValueError("data must vary: every data point is the same, so the model explains it exactly, "
                         "sigma^2 tends to 0 and the ELBO grows without bound")
    batches = _Batches(x.size(0), x.size(0) if batch_size is None else check_int(batch_size, "batch_size"),
                       int(seed))
    total_steps = _total_steps(steps, epochs, batches.steps_per_epoch)
    annealing = _check_annealing(annealing, loss, total_steps)
    _check_subsampling(guide, loss, batches)
    lr = check_positive(lr, "lr")
    schedule = _default_lr_schedule(lr_schedule)
    if optim is None:
        optim = pyro.optim.Adam({"lr": lr})
    elif not isinstance(optim, pyro.optim.PyroOptim):
        raise ValueError(f"optim must be a pyro.optim.PyroOptim, got {optim!r}")
    # fit sets the learning rate when it owns the optimiser or a schedule asks for it.
    manage_lr = lr_schedule is not None or optim.pt_optim_args == {"lr": lr}
    if manage_lr and not isinstance(optim.pt_optim_args, dict):
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
    if annealing is not None:
        loss.annealing = annealing
    return FitOptions(loss, batches, total_steps, optim, lr, schedule, manage_lr, record_every, eval_every,
                      trace_elbo_every, trace_elbo_particles, checkpoint, checkpoint_every, data_variance)


def _check_annealing(annealing, loss, total_steps):
    if annealing is None:
        return None
    if not isinstance(loss, EntropyELBO):
        raise ValueError(f"annealing weights the entropy terms of EntropyELBO; {type(loss).__name__} has none")
    if isinstance(annealing, str) and annealing == "default":
        annealing = Annealing.default(max(1, total_steps // 2))
    if not isinstance(annealing, Annealing):
        raise ValueError(f"annealing must be an Annealing, 'default' or None, got {annealing!r}")
    if loss.annealing is not None and loss.annealing is not annealing:
        raise ValueError(f"annealing: the loss already anneals with {loss.annealing!r} (from "
                         f"EntropyELBO(annealing=...) or an earlier fit); pass one schedule, in one place")
    return annealing


def fit(model, guide, data, loss=None, *, steps=None, epochs=None, batch_size=None, lr=0.05,
        lr_schedule=None, optim=None, seed=0, device=None, dtype=None, progress=True, record_every=1,
        eval_every=None, trace_elbo_every=None, trace_elbo_particles=16, checkpoint=None, checkpoint_every=None,
        resume=None, callback=None, annealing=None):
    """Train ``model`` and ``guide`` on ``data`` with SVI; return a :class:`~pyro_esc.History`.

    Each step is one ``SVI.step`` on the full data (``batch_size=None``) or on a
    minibatch of indices, passed to model and guide as ``subsample=...``
    (Pyro's subsampling idiom). Minibatches are a fresh random permutation per
    epoch. With :class:`~pyro_esc.EntropyELBO` (the default loss) each step is
    followed by ``loss.update(...)``, which writes lambda*, sigma^2* of the
    parameters after the step into the model and, for minibatches, keeps the
    whole-data running statistics current (see
    :class:`~pyro_esc.statistics.RunningStatistics`).

    What is recorded (see :class:`~pyro_esc.History`): the objective at every
    ``record_every``-th step (``History.elbo``, with ``History.elbo_kind``
    saying whether it is exact or an estimate) and the exact full-data ELBO
    every ``eval_every`` steps and after the last (``History.eval_elbo``;
    ``History.final_elbo`` is the number to report).

    :param model: a :class:`~pyro_esc.SparseCoding` (or any Pyro model taking ``(x, subsample=None)``).
    :param guide: a guide for it.
    :param data: the data, (N, D): a tensor (keeps its dtype) or an array (converted to ``dtype``).
        Constant data (every point the same) is rejected: its ELBO is unbounded.
    :param loss: a ``pyro.infer.ELBO``; default ``EntropyELBO()``.
    :param int steps: number of optimisation steps (default 1000 if ``epochs`` is not given).
    :param int epochs: alternatively, passes over the data (ceil(N / batch_size) steps each).
    :param int batch_size: minibatch size; None for full batch.
    :param float lr: Adam learning rate.
    :param lr_schedule: None/'constant', 'cosine' (to 0.1 lr), 'exponential' (to 0.1 lr) or
        a callable f(progress in [0, 1]) -> factor on ``lr``.
    :param optim: a ``pyro.optim.PyroOptim`` to use instead of Adam(lr) (then ``lr`` only
        feeds the schedule, if any).
    :param int seed: seeds Pyro's RNG and the minibatch order.
    :param device: move data, model and guide there (default: the data's device).
    :param dtype: dtype for array data (default torch's default dtype).
    :param bool progress: show a tqdm progress bar with the objective, lambda and sigma^2.
    :param int record_every: record the history every this many steps (and at the last).
    :param int eval_every: record the exact full-data ELBO every this many steps (and after the
        last); default: once per epoch for minibatches, after the last step for full batch.
    :param int trace_elbo_every: every this many steps also record a Monte Carlo estimate of
        the ELBO per data point with Pyro's ``Trace_ELBO`` (vectorised particles) on the full data.
    :param int trace_elbo_particles: particles for that estimate.
    :param str checkpoint: path to save a checkpoint to, every ``checkpoint_every`` steps and at the end.
    :param int checkpoint_every: see ``checkpoint``.
    :param str resume: path of a checkpoint to continue from; ``steps``/``epochs`` are the total.
    :param callback: optional ``callback(step, history)``, called after each recorded step.
    :param annealing: entropy annealing for an :class:`~pyro_esc.EntropyELBO` loss: an
        :class:`~pyro_esc.annealing.Annealing`, or ``"default"`` for
        :meth:`~pyro_esc.annealing.Annealing.default` over the first half of the steps (the true
        objective after). Equivalent to ``loss=EntropyELBO(annealing=...)``; fit sets the weights
        before every step (``EntropyELBO.set_annealing_step``) and records them in ``History.betas``.
    :raises NonFiniteObjectiveError: if the objective or a parameter becomes NaN or inf, or the
        noise variance collapses; the message says at which step and which term.
    """
    x = _prepare_data(data, device, dtype)
    options = check_fit_options(
        model, guide, x, loss, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
        optim=optim, seed=seed, record_every=record_every, eval_every=eval_every,
        trace_elbo_every=trace_elbo_every, trace_elbo_particles=trace_elbo_particles, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, annealing=annealing)
    loss, batches, total_steps = options.loss, options.batches, options.total_steps
    for module in (model, guide):
        if isinstance(module, torch.nn.Module):
            module.to(x.device)
    svi = SVI(model, guide, options.optim, loss=loss)

    history = History(num_data=x.size(0), elbo_kind=options.elbo_kind)
    start_step, elapsed = 0, 0.0
    if resume is not None:
        start_step, elapsed, history = restore_checkpoint(resume, model, guide, svi, loss, batches, x)
    else:
        pyro.set_rng_seed(int(seed))

    def save(step):
        save_checkpoint(checkpoint, step, model, guide, svi, loss, batches, history,
                        time.perf_counter() - started, x)

    bar = tqdm(total=total_steps, initial=start_step, disable=not progress, desc="fit", dynamic_ncols=True)
    started = time.perf_counter() - elapsed
    try:
        for step in range(start_step + 1, total_steps + 1):
            if options.manage_lr:
                _set_lr(options.optim, options.lr * options.schedule((step - 1) / max(1, total_steps - 1)))
            subsample = batches.next()
            kwargs = {} if subsample is None else {"subsample": subsample.to(x.device)}
            value = training_step(svi, model, guide, x, kwargs, step, options)
            if step % options.record_every == 0 or step == total_steps:
                history.record(step, step / batches.steps_per_epoch, value, model, _current_lr(options.optim),
                               getattr(loss, "betas", (1.0, 1.0, 1.0)), time.perf_counter() - started)
                if options.trace_elbo_every is not None and (step % options.trace_elbo_every == 0
                                                             or step == total_steps):
                    history.trace_elbo_step.append(step)
                    history.trace_elbo.append(_trace_elbo(model, guide, x, options.trace_elbo_particles))
                if progress:
                    bar.set_postfix(history.progress_postfix(), refresh=False)
            if options.eval_due(step):
                value, history.eval_kind = _exact_elbo(model, guide, x, loss)
                history.eval_step.append(step)
                history.eval_elbo.append(value)
            if callback is not None and history.step and history.step[-1] == step:
                callback(step, history)
            bar.update(1)
            if options.checkpoint_every is not None and step % options.checkpoint_every == 0 and step != total_steps:
                _check_parameters_finite(step)
                save(step)
    finally:
        bar.close()
    _check_parameters_finite(total_steps)
    if checkpoint is not None:
        save(total_steps)
    return history


def training_step(svi, model, guide, x, kwargs, step, options):
    """One training step: the SVI update, then the explicit post-step update of an EntropyELBO.

    :returns: the objective to record (a loss: -N ELBO). For EntropyELBO it is the value
        after the step (exact on the full data; the running estimate on a minibatch);
        for other objectives the value the step evaluated.
    :raises NonFiniteObjectiveError: naming the step and the term or site.
    """
    loss = options.loss
    if isinstance(loss, EntropyELBO):
        loss.set_annealing_step(step - 1)
    try:
        value = svi.step(x, **kwargs)
        if isinstance(loss, EntropyELBO):
            terms = loss.update(model, guide, x, **kwargs)
            value = float(-terms.num_data * terms.elbo)
            if float(terms.noise_var) < NOISE_COLLAPSE * options.data_variance:
                raise NonFiniteObjectiveError(
                    f"the noise variance sigma^2* collapsed to {float(terms.noise_var):g} (data variance "
                    f"{options.data_variance:g}): the model reproduces the data exactly (data of rank < H?), "
                    f"and the ELBO grows without bound")
    except NonFiniteObjectiveError as error:
        raise NonFiniteObjectiveError(f"step {step}: {error}") from error
    except ValueError as error:
        # Pyro's distribution validation fails first when a parameter is NaN.
        if _non_finite_parameters():
            raise NonFiniteObjectiveError(
                f"step {step}: {type(loss).__name__} failed ({error.args[0].splitlines()[0]}); "
                f"{_diagnose_non_finite(model, guide, x, kwargs)}") from error
        raise
    if not math.isfinite(value):
        raise NonFiniteObjectiveError(
            f"step {step}: {type(loss).__name__} loss is {value}; {_diagnose_non_finite(model, guide, x, kwargs)}")
    return value


def _exact_elbo(model, guide, x, loss):
    """The full-data ELBO per data point and its kind, without changing anything.

    Closed-form objectives evaluate themselves; under a sampled objective a
    Gaussian guide is evaluated in closed form (AnalyticELBO at the model's
    scales), any other guide by the objective's own Monte Carlo estimate.
    """
    if isinstance(loss, EntropyELBO):
        return training_elbo(model, guide, x), EXACT
    try:
        return held_out_elbo(model, guide, x), EXACT
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


def _prepare_data(data, device, dtype):
    is_array = not isinstance(data, torch.Tensor)
    x = check_data(data, "data", allow_numpy=True)
    if is_array:
        x = x.to(dtype or torch.get_default_dtype())
    elif dtype is not None:
        x = x.to(dtype)
    if device is not None:
        x = x.to(device)
    return x


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


def _set_lr(optim, lr):
    # PyroOptim keeps one torch optimiser per parameter, created on first sight.
    optim.pt_optim_args["lr"] = lr
    for optimizer in optim.optim_objs.values():
        for group in optimizer.param_groups:
            group["lr"] = lr


def _current_lr(optim):
    # The rate the optimisers use now (ClippedAdam decays it inside); the first
    # parameter's, as they share a schedule.
    for optimizer in optim.optim_objs.values():
        return float(optimizer.param_groups[0]["lr"])
    return optim.pt_optim_args["lr"] if isinstance(optim.pt_optim_args, dict) else float("nan")


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


