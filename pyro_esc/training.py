"""The training loop: :func:`fit` runs SVI and records what happened.

One function owns the loop so that every experiment, notebook and the command
line train the same way: steps or epochs, minibatches, learning rate and its
schedule, a seed, the device, a progress bar, a :class:`History`, checkpoints
that resume bit-for-bit on CPU, and a clear stop when anything turns
non-finite.
"""

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import List

import torch
from tqdm.auto import tqdm

import pyro
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.util import get_rng_state, set_rng_state

from ._checks import check_data, check_int, check_positive
from .annealing import Annealing
from .objectives import AnalyticELBO, EntropyELBO, NonFiniteObjectiveError

CHECKPOINT_FORMAT = "pyro_esc.checkpoint/1"


@dataclass
class History:
    """What :func:`fit` recorded, one entry per recorded step (lists of floats).

    ``loss`` is the objective the loss function reported (Pyro's sign and scale,
    -N ELBO; the true, unweighted value under annealing; a batch estimate for
    minibatches under sampled objectives), ``elbo`` = -loss / N (per data point,
    higher is better). ``trace_elbo`` holds the periodic Monte Carlo estimates
    of the ELBO per data point (Pyro's ``Trace_ELBO``) at ``trace_elbo_step``.
    """

    num_data: int = 0
    step: List[int] = field(default_factory=list)
    epoch: List[float] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    elbo: List[float] = field(default_factory=list)
    prior_scale: List[List[float]] = field(default_factory=list)
    noise_var: List[float] = field(default_factory=list)
    wall_time: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    betas: List[List[float]] = field(default_factory=list)
    trace_elbo_step: List[int] = field(default_factory=list)
    trace_elbo: List[float] = field(default_factory=list)

    def __len__(self):
        return len(self.step)

    def to_dict(self):
        """Plain lists and numbers (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state):
        return cls(**state)


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


def fit(model, guide, data, loss=None, *, steps=None, epochs=None, batch_size=None, lr=0.05,
        lr_schedule=None, optim=None, seed=0, device=None, dtype=None, progress=True, record_every=1,
        trace_elbo_every=None, trace_elbo_particles=16, checkpoint=None, checkpoint_every=None,
        resume=None, callback=None, annealing=None):
    """Train ``model`` and ``guide`` on ``data`` with SVI; return a :class:`History`.

    Each step is one ``SVI.step`` on the full data (``batch_size=None``) or on a
    minibatch of indices, passed to model and guide as ``subsample=...``
    (Pyro's subsampling idiom). Minibatches are a fresh random permutation per
    epoch. With :class:`~pyro_esc.EntropyELBO` (the default loss) lambda* and
    sigma^2* then come from whole-data-set running statistics (see
    :class:`~pyro_esc.objectives.RunningStatistics`).

    :param model: a :class:`~pyro_esc.SparseCoding` (or any Pyro model taking ``(x, subsample=None)``).
    :param guide: a guide for it.
    :param data: the data, (N, D): a tensor (keeps its dtype) or an array (converted to ``dtype``).
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
        objective after). Equivalent to ``loss=EntropyELBO(annealing=...)``; the weights used are
        in ``History.betas``.
    :raises NonFiniteObjectiveError: if the objective or a parameter becomes NaN or inf; the
        message says at which step and which term.
    """
    x = _prepare_data(data, device, dtype)
    num_data = x.size(0)
    loss = EntropyELBO() if loss is None else loss
    if not isinstance(loss, pyro.infer.ELBO):
        raise ValueError(f"loss must be a pyro.infer.ELBO (e.g. EntropyELBO()), got {loss!r}")
    for module in (model, guide):
        if isinstance(module, torch.nn.Module):
            module.to(x.device)
    batches = _Batches(num_data, num_data if batch_size is None else check_int(batch_size, "batch_size"),
                       int(seed))
    total_steps = _total_steps(steps, epochs, batches.steps_per_epoch)
    if annealing is not None:
        if not isinstance(loss, EntropyELBO):
            raise ValueError(f"annealing weights the entropy terms of EntropyELBO; {type(loss).__name__} has none")
        if isinstance(annealing, str) and annealing == "default":
            annealing = Annealing.default(max(1, total_steps // 2))
        if not isinstance(annealing, Annealing):
            raise ValueError(f"annealing must be an Annealing, 'default' or None, got {annealing!r}")
        if loss.annealing is not None and loss.annealing is not annealing:
            raise ValueError(f"annealing: the loss already anneals with {loss.annealing!r} (from "
                             f"EntropyELBO(annealing=...) or an earlier fit); pass one schedule, in one place")
        loss.annealing = annealing
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
    if trace_elbo_every is not None:
        trace_elbo_every = check_int(trace_elbo_every, "trace_elbo_every")
    if checkpoint_every is not None:
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every")
        if checkpoint is None:
            raise ValueError("checkpoint_every needs a checkpoint path")
    svi = SVI(model, guide, optim, loss=loss)

    history = History(num_data=num_data)
    start_step, elapsed = 0, 0.0
    if resume is not None:
        start_step, elapsed, history = _restore(resume, model, guide, svi, loss, batches, x)
    else:
        pyro.set_rng_seed(int(seed))

    bar = tqdm(total=total_steps, initial=start_step, disable=not progress, desc="fit", dynamic_ncols=True)
    started = time.perf_counter() - elapsed
    try:
        for step in range(start_step + 1, total_steps + 1):
            if manage_lr:
                _set_lr(optim, lr * schedule((step - 1) / max(1, total_steps - 1)))
            subsample = batches.next()
            kwargs = {} if subsample is None else {"subsample": subsample.to(x.device)}
            try:
                value = svi.step(x, **kwargs)
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
                    f"step {step}: {type(loss).__name__} loss is {value}; "
                    f"{_diagnose_non_finite(model, guide, x, kwargs)}")
            if step % record_every == 0 or step == total_steps:
                _record(history, step, step / batches.steps_per_epoch, value, model, loss, optim,
                        time.perf_counter() - started)
                if trace_elbo_every is not None and (step % trace_elbo_every == 0 or step == total_steps):
                    history.trace_elbo_step.append(step)
                    history.trace_elbo.append(_trace_elbo(model, guide, x, trace_elbo_particles))
                if progress and history.elbo:
                    bar.set_postfix(_postfix(history), refresh=False)
                if callback is not None:
                    callback(step, history)
            bar.update(1)
            if checkpoint_every is not None and step % checkpoint_every == 0 and step != total_steps:
                _check_parameters_finite(step)
                save_checkpoint(checkpoint, step, model, guide, svi, loss, batches, history,
                                time.perf_counter() - started)
    finally:
        bar.close()
    _check_parameters_finite(total_steps)
    if checkpoint is not None:
        save_checkpoint(checkpoint, total_steps, model, guide, svi, loss, batches, history,
                        time.perf_counter() - started)
    return history


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


def _record(history, step, epoch, value, model, loss, optim, wall_time):
    history.step.append(step)
    history.epoch.append(epoch)
    history.loss.append(value)
    history.elbo.append(-value / history.num_data)
    prior_scale = getattr(model, "prior_scale", None)
    noise_var = getattr(model, "noise_var", None)
    history.prior_scale.append(prior_scale.detach().cpu().tolist() if prior_scale is not None else [])
    history.noise_var.append(float(noise_var.detach()) if noise_var is not None else float("nan"))
    history.wall_time.append(wall_time)
    history.lr.append(_current_lr(optim))
    history.betas.append(list(getattr(loss, "betas", (1.0, 1.0, 1.0))))


def _current_lr(optim):
    # The rate the optimisers use now (ClippedAdam decays it inside); the first
    # parameter's, as they share a schedule.
    for optimizer in optim.optim_objs.values():
        return float(optimizer.param_groups[0]["lr"])
    return optim.pt_optim_args["lr"] if isinstance(optim.pt_optim_args, dict) else float("nan")


def _postfix(history):
    postfix = {"elbo": f"{history.elbo[-1]:.4f}"}
    if history.prior_scale[-1]:
        postfix["lambda"] = f"{sum(history.prior_scale[-1]) / len(history.prior_scale[-1]):.3g}"
    if math.isfinite(history.noise_var[-1]):
        postfix["sigma2"] = f"{history.noise_var[-1]:.3g}"
    return postfix


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


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(path, step, model, guide, svi, loss, batches, history, wall_time):
    """Write everything :func:`fit` needs to resume bit-for-bit (atomically: temp file + rename)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "wall_time": wall_time,
        "param_store": pyro.get_param_store().get_state(),
        "optim": svi.optim.get_state(),
        "model": model.state_dict() if isinstance(model, torch.nn.Module) else None,
        "guide": guide.state_dict() if isinstance(guide, torch.nn.Module) else None,
        "loss": loss.state_dict() if hasattr(loss, "state_dict") else None,
        "rng": get_rng_state(),
        "batches": batches.state_dict(),
        "history": history.to_dict(),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp"
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path):
    """Read a checkpoint written by :func:`fit` (a dict; see :func:`save_checkpoint`)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
        raise ValueError(f"checkpoint {path!r} could not be read: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a pyro_esc checkpoint ({CHECKPOINT_FORMAT})")
    return state


def _restore(path, model, guide, svi, loss, batches, x):
    state = load_checkpoint(path)
    # Order matters: the model's "initialized" flag first (or the next model run
    # re-initialises from data), then the param store, then the guide's lazy
    # setup (which may draw random numbers), and the RNG state last.
    if state["model"] is not None and isinstance(model, torch.nn.Module):
        model.load_state_dict(state["model"])
    store = pyro.get_param_store()
    store.clear()
    store.set_state(state["param_store"])
    with poutine.block():
        guide(x)
    if state["guide"] is not None and isinstance(guide, torch.nn.Module):
        guide.load_state_dict(state["guide"])
    svi.optim.set_state(state["optim"])
    if state["loss"] is not None and hasattr(loss, "load_state_dict"):
        loss.load_state_dict(state["loss"], x)
    batches.load_state_dict(state["batches"])
    set_rng_state(state["rng"])
    return state["step"], state["wall_time"], History.from_dict(state["history"])
