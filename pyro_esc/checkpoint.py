"""Checkpoints of :func:`~pyro_esc.fit`: everything needed to resume a run bit-for-bit.

A checkpoint holds the param store, the optimiser state, the model's and the
guide's module state, the objective's state (annealing step, running
statistics), the RNG state, the minibatch order and the :class:`~pyro_esc.History`
so far. It is a training-resume format, written atomically (temporary file,
then rename).
"""

import os

import torch

import pyro
from pyro import poutine
from pyro.util import get_rng_state, set_rng_state

from .objectives import EntropyELBO

CHECKPOINT_FORMAT = "pyro_esc.checkpoint/3"


def save_checkpoint(path, step, model, guide, optim_state, loss, batches, history, wall_time, x=None):
    """Write everything :func:`~pyro_esc.fit` needs to resume bit-for-bit (atomically: temp file + rename)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "wall_time": wall_time,
        "param_store": pyro.get_param_store().get_state(),
        "optim": optim_state,
        "model": model.state_dict() if isinstance(model, torch.nn.Module) else None,
        "guide": guide.state_dict() if isinstance(guide, torch.nn.Module) else None,
        "loss": loss.state_dict(model, guide, x) if isinstance(loss, EntropyELBO) else None,
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
    """Read a checkpoint written by :func:`~pyro_esc.fit` (a dict; see :func:`save_checkpoint`)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is bad input
        raise ValueError(f"checkpoint {path!r} could not be read: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a pyro_esc checkpoint ({CHECKPOINT_FORMAT})")
    return state


def restore_checkpoint(path, model, guide, loss, batches, x):
    """Load ``path`` into a fresh run's objects; return the checkpoint (a dict).

    The caller loads ``state["optim"]`` into its optimiser, which it builds after
    this (the torch route finds its parameters in the restored param store).
    """
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
    if state["loss"] is not None and isinstance(loss, EntropyELBO):
        loss.load_state_dict(state["loss"], model, guide, x)
    batches.load_state_dict(state["batches"])
    set_rng_state(state["rng"])
    return state
