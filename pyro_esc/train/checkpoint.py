"""Checkpoints of :func:`~pyro_esc.fit`: everything needed to resume a run bit-for-bit, in a file that runs no code.

A checkpoint holds the param store, the optimiser state, the model's and the
guide's module state, the objective's state (annealing step, running
statistics), the RNG state, the minibatch order and the :class:`~pyro_esc.History`
so far, plus what it was trained on: the classes of model, guide and objective,
the route, and a fingerprint of the data (shape, dtype and a SHA-256 of its bytes).

**Safety.** Only plain values are stored (tensors, numbers, strings, lists, dicts);
the param store's constraints are written by name (:func:`encode_constraint`) and
the numpy RNG state as a tensor, so the file is read with
``torch.load(weights_only=True)``: no pickled object, no ``__reduce__`` payload, no
code runs when a checkpoint is read, whoever wrote it.

**Integrity.** The payload is serialised on its own and wrapped in an envelope
``{"format", "sha256", "payload"}``: a file whose bytes were changed fails the hash
(or the envelope's parse) and is a ValueError, never a run that trains on from
damaged parameters. Resuming checks the data fingerprint and the classes before
anything is restored, so other data of the same shape, or another guide family,
is a ValueError that says so.

**Restoring.** The param store is replaced by the checkpoint's tensors, and the model's and
guide's parameters are then bound to them (a plain ``nn.Parameter``, such as an encoder's weights,
would otherwise keep computing with its own tensor while the optimiser trains the store's). A run
that trains in the data's standard units (:mod:`pyro_esc.standard_units`) checkpoints its model and
guide in those units and its History in the data's own; resuming through :func:`~pyro_esc.fit`
handles both.

Written atomically (temporary file, then rename).
"""

import hashlib
import io
import os

import numpy as np
import torch

import pyro
from pyro import poutine
from pyro.distributions import constraints
from pyro.util import set_rng_state, get_rng_state

from .._files import load_error_summary, read_plain
from .._pyro_internals import share_parameters_with_store
from ..infer.objectives import EntropyELBO
from ..infer.statistics import RunningStatistics

__all__ = ["CHECKPOINT_FORMAT", "data_fingerprint", "decode_constraint", "encode_constraint", "load_checkpoint",
           "restore_checkpoint", "save_checkpoint"]

#: The envelope's format tag; :func:`load_checkpoint` refuses anything else (older formats pickled objects).
CHECKPOINT_FORMAT = "pyro_esc.checkpoint/4"

#: Constraints without arguments, by the name a checkpoint stores.
_PLAIN_CONSTRAINTS = {
    "real": constraints.real,
    "real_vector": constraints.real_vector,
    "softplus_positive": constraints.softplus_positive,
    "unit_interval": constraints.unit_interval,
    "simplex": constraints.simplex,
    "lower_cholesky": constraints.lower_cholesky,
    "softplus_lower_cholesky": constraints.softplus_lower_cholesky,
    "corr_cholesky": constraints.corr_cholesky,
    "positive_definite": constraints.positive_definite,
    "nonnegative": constraints.nonnegative,
}
#: Constraints with bounds: the class and the bound attributes stored.
_BOUNDED_CONSTRAINTS = {
    "greater_than": (type(constraints.greater_than(0.0)), ("lower_bound",), constraints.greater_than),
    "greater_than_eq": (type(constraints.greater_than_eq(0.0)), ("lower_bound",), constraints.greater_than_eq),
    "less_than": (type(constraints.less_than(0.0)), ("upper_bound",), constraints.less_than),
    "interval": (type(constraints.interval(0.0, 1.0)), ("lower_bound", "upper_bound"), constraints.interval),
}


def encode_constraint(constraint, where="a parameter"):
    """A plain dict that names ``constraint`` (what a checkpoint stores instead of the object).

    :raises ValueError: for a constraint this format does not know (it is never pickled instead).
    """
    if isinstance(constraint, constraints.independent):
        return {"name": "independent", "base": encode_constraint(constraint.base_constraint, where),
                "reinterpreted_batch_ndims": int(constraint.reinterpreted_batch_ndims)}
    for name, known in _PLAIN_CONSTRAINTS.items():
        if constraint is known:
            return {"name": name}
    for name, (cls, bounds, _) in _BOUNDED_CONSTRAINTS.items():
        if type(constraint) is cls:
            return {"name": name, **{bound: float(getattr(constraint, bound)) for bound in bounds}}
    raise ValueError(f"{where} has the constraint {constraint!r}, which a checkpoint cannot name (it stores "
                     f"{sorted(_PLAIN_CONSTRAINTS)}, {sorted(_BOUNDED_CONSTRAINTS)} and independent(...)); "
                     f"train without checkpoint, or use one of those constraints")


def decode_constraint(spec):
    """The constraint object that :func:`encode_constraint` named."""
    name = spec["name"]
    if name == "independent":
        return constraints.independent(decode_constraint(spec["base"]), int(spec["reinterpreted_batch_ndims"]))
    if name in _PLAIN_CONSTRAINTS:
        return _PLAIN_CONSTRAINTS[name]
    if name in _BOUNDED_CONSTRAINTS:
        _, bounds, make = _BOUNDED_CONSTRAINTS[name]
        return make(*(float(spec[bound]) for bound in bounds))
    raise ValueError(f"unknown constraint {name!r}")


def data_fingerprint(x):
    """What identifies the data a run trains on: ``{"shape", "dtype", "sha256"}`` of its bytes (one pass)."""
    flat = x.detach().contiguous().reshape(-1).cpu()
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""), "sha256": digest}


def _plain_rng_state():
    state = get_rng_state()
    kind, keys, position, has_gauss, cached = state["numpy"]
    version, internal, gauss = state["random"]
    return {"torch": state["torch"], "random": [version, list(internal), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]}


def _rng_state_from_plain(plain):
    kind, keys, position, has_gauss, cached = plain["numpy"]
    version, internal, gauss = plain["random"]
    return {"torch": plain["torch"], "random": (version, tuple(internal), gauss),
            "numpy": (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached)}


def _describe(model, guide, loss, route):
    return {"model": type(model).__name__, "guide": type(guide).__name__, "loss": type(loss).__name__,
            "route": route, "prior": repr(getattr(model, "prior", None))}


#: What a checkpoint written before priors were pluggable (no "prior" entry) was trained with.
_DEFAULT_DESCRIPTION = {"prior": "Laplace()"}


def save_checkpoint(path, step, model, guide, optim_state, loss, batches, history, wall_time, x, route,
                    fingerprint=None, statistics=None):
    """Write everything :func:`~pyro_esc.fit` needs to resume bit-for-bit (atomically: temp file + rename).

    :param fingerprint: :func:`data_fingerprint` of ``x``, if the caller has it (it costs a pass over x).
    :param statistics: the run's running minibatch statistics (the loop's state), or None.
    """
    store = pyro.get_param_store().get_state()
    payload = {
        "step": step,
        "wall_time": wall_time,
        "run": _describe(model, guide, loss, route),
        "data": data_fingerprint(x) if fingerprint is None else fingerprint,
        "param_store": {"params": store["params"],
                        "constraints": {name: encode_constraint(constraint, f"parameter {name!r}")
                                        for name, constraint in store["constraints"].items()}},
        "optim": optim_state,
        "model": model.state_dict() if isinstance(model, torch.nn.Module) else None,
        "guide": guide.state_dict() if isinstance(guide, torch.nn.Module) else None,
        "loss": ({"annealing_step": loss.annealing_step,
                  "running": None if statistics is None else statistics.state_dict()}
                 if isinstance(loss, EntropyELBO) else None),
        "rng": _plain_rng_state(),
        "batches": batches.state_dict(),
        "history": history.to_dict(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    raw = buffer.getvalue()
    envelope = {"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(raw).hexdigest(),
                "payload": torch.frombuffer(bytearray(raw), dtype=torch.uint8)}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp"
    torch.save(envelope, temporary)
    os.replace(temporary, path)


def load_checkpoint(path):
    """Read a checkpoint written by :func:`~pyro_esc.fit` (a dict; see :func:`save_checkpoint`).

    Reads with ``torch.load(weights_only=True)`` (no code runs) and checks the envelope's SHA-256.

    :raises ValueError: for a missing file, a file that is not a checkpoint of this format, or a damaged one.
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        envelope = read_plain(path, map_location="cpu")
    except ValueError as error:
        raise ValueError(f"checkpoint {path!r} could not be read as a {CHECKPOINT_FORMAT} file ({error}); "
                         f"checkpoints of earlier versions stored pickled objects and are not read") from None
    if not isinstance(envelope, dict) or envelope.get("format") != CHECKPOINT_FORMAT:
        found = envelope.get("format") if isinstance(envelope, dict) else type(envelope).__name__
        raise ValueError(f"{path!r} is not a pyro_esc checkpoint of format {CHECKPOINT_FORMAT!r} (found {found!r})")
    payload = envelope.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError(f"checkpoint {path!r} is damaged: it has no payload")
    raw = payload.numpy().tobytes()
    if hashlib.sha256(raw).hexdigest() != envelope.get("sha256"):
        raise ValueError(f"checkpoint {path!r} is damaged: its content does not match its SHA-256 checksum "
                         f"(the file was changed or truncated after it was written)")
    try:
        state = read_plain(io.BytesIO(raw), map_location="cpu")
        state["param_store"]["constraints"] = {name: decode_constraint(spec) for name, spec
                                               in state["param_store"]["constraints"].items()}
        state["rng"] = _rng_state_from_plain(state["rng"])
        state["format"] = CHECKPOINT_FORMAT
    except Exception as error:  # noqa: BLE001 - the checksum matched, so this is a writer's bug or a forgery
        raise ValueError(f"checkpoint {path!r} is damaged: {load_error_summary(error)}") from None
    return state


def check_resumable(state, path, model, guide, loss, route, fingerprint):
    """Refuse a checkpoint that belongs to another run: other data, model, guide, objective or route."""
    expected = _describe(model, guide, loss, route)
    for key, value in expected.items():
        theirs = state["run"].get(key, _DEFAULT_DESCRIPTION.get(key))
        if theirs != value:
            raise ValueError(f"resume: checkpoint {path!r} was written by a run with {key} "
                             f"{theirs!r}, this run has {value!r}; resume with the same model, "
                             f"prior, guide, loss and optimizer")
    data = state["data"]
    if data["shape"] != fingerprint["shape"] or data["dtype"] != fingerprint["dtype"]:
        raise ValueError(f"resume: checkpoint {path!r} was trained on data of shape {tuple(data['shape'])} and "
                         f"dtype {data['dtype']}, this run has {tuple(fingerprint['shape'])} and "
                         f"{fingerprint['dtype']}; resume with the data it was trained on")
    if data["sha256"] != fingerprint["sha256"]:
        raise ValueError(f"resume: checkpoint {path!r} was trained on other data of the same shape (the data's "
                         f"SHA-256 differs); resume with the data it was trained on")
    if isinstance(model, torch.nn.Module) and state["model"] is not None:
        mine = model.state_dict()
        theirs = state["model"]
        if set(mine) != set(theirs) or any(mine[key].shape != theirs[key].shape for key in mine):
            raise ValueError(f"resume: checkpoint {path!r} holds a {state['run']['model']} whose state does not "
                             f"match this model's (another size?); resume with the same model")


def restore_checkpoint(path, model, guide, loss, batches, x, route, fingerprint=None):
    """Load ``path`` into a fresh run's objects; return the checkpoint (a dict).

    Everything is checked before anything is changed: the file (:func:`load_checkpoint`), then
    that it belongs to this run (:func:`check_resumable`). The caller loads ``state["optim"]``
    into its optimiser, which it builds after this (the torch route finds its parameters in
    the restored param store), and takes ``state["statistics"]``, the run's running minibatch
    statistics rebuilt for ``(model, guide, x)`` (or None), as its own.
    """
    state = load_checkpoint(path)
    check_resumable(state, path, model, guide, loss, route, data_fingerprint(x) if fingerprint is None
                    else fingerprint)
    # Order matters: the model's "initialized" flag first (or the next model run
    # re-initialises from data), then the param store, then the guide's lazy
    # setup (which may draw random numbers), and the RNG state last.
    if state["model"] is not None and isinstance(model, torch.nn.Module):
        model.load_state_dict(state["model"])
    store = pyro.get_param_store()
    store.clear()
    store.set_state(state["param_store"])
    try:
        with poutine.block():
            guide(x)
        if state["guide"] is not None and isinstance(guide, torch.nn.Module):
            guide.load_state_dict(state["guide"])
        for module in (model, guide):
            # The modules must compute with (and show) the tensors the optimiser will train: the store's.
            share_parameters_with_store(module)
    except (RuntimeError, KeyError) as error:
        raise ValueError(f"resume: checkpoint {path!r} does not fit this {type(guide).__name__} "
                         f"({load_error_summary(error)}); resume with the guide it was trained with") from None
    state["statistics"] = None
    if state["loss"] is not None and isinstance(loss, EntropyELBO):
        loss.set_annealing_step(int(state["loss"]["annealing_step"]))
        if state["loss"]["running"] is not None:
            state["statistics"] = RunningStatistics.from_state(model, guide, x, state["loss"]["running"])
    batches.load_state_dict(state["batches"])
    set_rng_state(state["rng"])
    return state
