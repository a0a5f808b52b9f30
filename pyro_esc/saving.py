"""Save and load a trained model: :func:`save`, :func:`load`.

A file holds the model (dictionary W, lambda, sigma^2), optionally its guide
(an amortised encoder; per-point posteriors only when asked for), the whitening
the data went through, and JSON-like metadata. It is written with
``torch.save`` from plain tensors, numbers, strings, lists and dicts, and read
with ``torch.load(weights_only=True)``, which executes no code: a file from
elsewhere cannot run anything on load. It carries a format version.

Unlike a training checkpoint (:mod:`pyro_esc.checkpoint`, which resumes a run
bit-for-bit), this is for using the model: encoding new data
(:func:`~pyro_esc.encode`), held-out ELBOs, denoising.
"""

import numbers
from typing import NamedTuple, Optional

import torch
from pyro.distributions import constraints
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam

import pyro

from ._files import read_plain
from ._pyro_internals import module_name, own_parameters, param_fullname
from .data.whitening import Whitening
from .models.sparse_coding import MODEL_PARAMETERS, SparseCoding
from .priors import get_prior, registered_priors
from .variational.guides import AmortizedNormal
from .variational.registry import guide_name, make_guide

__all__ = ["MODEL_FORMAT", "Loaded", "load", "save"]

#: The format tag every file carries; :func:`load` refuses others.
MODEL_FORMAT = "pyro_esc.model/1"


class Loaded(NamedTuple):
    """What :func:`load` returns."""

    model: SparseCoding  #: the trained model, W, lambda and sigma^2 set
    guide: Optional[object]  #: the guide, if one was saved, else None
    whitening: Optional[Whitening]  #: the whitening, if one was saved, else None
    metadata: dict  #: what was passed to :func:`save` as keyword arguments


def save(path, model, guide=None, whitening=None, per_point=False, **metadata):
    """Save a trained model (and optionally its guide and whitening) to ``path``.

    Example::

        >>> import os, tempfile, pyro, torch
        >>> from pyro_esc import LocalMultivariateNormal, SparseCoding, fit, load, save
        >>> from pyro_esc.data import bars
        >>> pyro.clear_param_store()
        >>> x, _ = bars(100, seed=0)
        >>> model = SparseCoding(25, 10)
        >>> history = fit(model, LocalMultivariateNormal(model), x, steps=30, tol=None, progress=False)
        >>> path = os.path.join(tempfile.mkdtemp(), "bars.pt")
        >>> save(path, model, run="bars", seed=0)          # plain tensors and metadata: loading runs no code
        >>> pyro.clear_param_store()
        >>> loaded = load(path)
        >>> torch.allclose(loaded.model.dictionary, model.dictionary), loaded.metadata["run"]
        (True, 'bars')

    :param model: a :class:`~pyro_esc.SparseCoding`.
    :param guide: optional: an :class:`~pyro_esc.AmortizedNormal` (its encoder is saved), or, with
        ``per_point=True``, a :class:`~pyro_esc.LocalMultivariateNormal` or ``AutoNormal`` (its N
        posteriors, which describe the training points only).
    :param whitening: optional :class:`~pyro_esc.data.Whitening` the data were transformed with.
    :param bool per_point: allow saving a per-point guide's N posteriors.
    :param metadata: JSON-like values (numbers, strings, bools, None, lists and dicts of them).
    :raises ValueError: for anything that cannot be saved faithfully (it is never dropped silently).
    """
    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding, got {type(model).__name__}")
    if whitening is not None and not isinstance(whitening, Whitening):
        raise ValueError(f"whitening must be a pyro_esc.data.Whitening or None, got {type(whitening).__name__}")
    for key, value in metadata.items():
        _check_plain(value, f"metadata[{key!r}]")
    payload = {
        "format": MODEL_FORMAT,
        "model": _model_state(model),
        "guide": None if guide is None else _guide_state(guide, per_point),
        "whitening": None if whitening is None else whitening.state_dict(),
        "metadata": dict(metadata),
    }
    torch.save(payload, path)


def load(path, map_location=None):
    """Load what :func:`save` wrote; returns :class:`Loaded` ``(model, guide, whitening, metadata)``.

    Reads with ``torch.load(weights_only=True)`` (no code runs). The objects'
    parameters enter Pyro's param store under their names when first used, as
    any PyroModule's do: if the store already holds parameters under those
    names (e.g. another SparseCoding in this process), that is a ValueError
    rather than a silent merge; clear the store (``pyro.clear_param_store()``)
    or load inside ``pyro.get_param_store().scope()``.

    Example::

        >>> import os, tempfile, torch
        >>> from pyro_esc import load
        >>> path = os.path.join(tempfile.mkdtemp(), "weights.pt")
        >>> torch.save({"weights": torch.zeros(3)}, path)   # a file that save did not write
        >>> load(path)                                       # refused before anything is built (save's example loads one)
        Traceback (most recent call last):
        ...
        ValueError: ... is not a pyro_esc model file of format 'pyro_esc.model/1' (found None); ...

    :param map_location: as for ``torch.load``, e.g. ``"cpu"`` or ``"cuda"``.
    :raises ValueError: for a file that is not a pyro_esc model file of a known format.
    """
    try:
        payload = read_plain(path, map_location=map_location)
    except ValueError as error:
        raise ValueError(f"{path!s} could not be read as a pyro_esc model file: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path!s} is not a pyro_esc model file of format {MODEL_FORMAT!r} (found {found!r}); "
                         f"training checkpoints load with pyro_esc.checkpoint.load_checkpoint")
    try:
        model = _build_model(payload["model"])
        guide = None if payload["guide"] is None else _build_guide(payload["guide"], model)
        whitening = None if payload["whitening"] is None else Whitening.from_state_dict(payload["whitening"])
        metadata = dict(payload["metadata"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path!s} is a damaged pyro_esc model file: {error}") from None
    return Loaded(model, guide, whitening, metadata)


# ---------------------------------------------------------------------- the model


def _model_state(model):
    with torch.no_grad(), own_parameters(model):  # its own values, whatever the store holds under its names
        return {"data_dim": model.data_dim, "n_latents": model.n_latents, "name": module_name(model),
                "dictionary": model.dictionary.detach().clone(), "prior_scale": model.prior_scale.detach().clone(),
                "noise_var": model.noise_var.detach().clone(),
                "prior": {"name": model.prior.name, "config": model.prior.config()}}


def _build_model(state):
    # Files written before priors were pluggable have no "prior": they are Laplace models. A prior is
    # stored as data (its registered name and settings), never as code.
    prior = state.get("prior", {"name": "laplace", "config": {}})
    if prior["name"] not in registered_priors():
        raise ValueError(f"the model in this file has the prior {prior['name']!r}, which no class in this process "
                         f"registers: import the module that defines it (a pyro_esc.priors.Prior subclass with "
                         f"name = {prior['name']!r}) before load")
    model = SparseCoding(state["data_dim"], state["n_latents"], name=state["name"],
                         prior=get_prior(prior["name"], **prior["config"]))
    _check_store_free([param_fullname(model, name) for name in MODEL_PARAMETERS])
    like = {"dtype": state["dictionary"].dtype, "device": state["dictionary"].device}
    model.to(**like)
    model.set_dictionary(state["dictionary"])
    model.set_scales(state["prior_scale"], state["noise_var"])
    return model


def _check_store_free(names):
    taken = [name for name in names if name in pyro.get_param_store()]
    if taken:
        raise ValueError(f"Pyro's param store already holds {taken}: loading would merge the loaded parameters "
                         f"with those. Call pyro.clear_param_store() first, or load inside "
                         f"pyro.get_param_store().scope()")


# ---------------------------------------------------------------------- guides


def _guide_state(guide, per_point):
    if isinstance(guide, AmortizedNormal):
        config = guide.config()  # plain values; a ValueError for an activation that has no name
        state = {key: value.detach().clone() for key, value in guide.state_dict().items()}
        return {"kind": "amortized", "name": module_name(guide), "config": config, "state": state}
    kind = guide_name(guide)  # the registry's name: "local-full", "local-diag", ...
    if kind not in ("local-full", "local-diag"):
        raise ValueError(f"save stores AmortizedNormal guides, and LocalMultivariateNormal or AutoNormal with "
                         f"per_point=True; got {type(guide).__name__}")
    if not per_point:
        raise ValueError(f"{type(guide).__name__} holds one posterior per training point, which describes only "
                         f"those points; pass per_point=True to save them (encode new data with "
                         f"pyro_esc.encode instead)")
    if guide.prototype_trace is None:
        raise ValueError(f"the {type(guide).__name__} has not run yet: it has no posteriors to save")
    with torch.no_grad():
        if kind == "local-full":
            values = {"locs": guide.locs.z, "scale_diags": guide.scale_diags.z,
                      "scale_offdiags": guide.scale_offdiags.z}
        else:
            values = {"locs": guide.locs.z, "scales": guide.scales.z}
        values = {key: value.detach().clone() for key, value in values.items()}
    return {"kind": kind, "name": module_name(guide), "values": values}


def _build_guide(state, model):
    kind = state["kind"]
    if kind == "amortized":
        config = state["config"]
        # Files written before the encoder options existed lack them: the defaults then apply (no skip
        # connection, which such encoders did not have).
        guide = AmortizedNormal(**dict(config, hidden=tuple(config["hidden"])))
        prefix = module_name(guide) + "."
        _check_store_free([name for name in pyro.get_param_store().keys() if name.startswith(prefix)])
        guide.load_state_dict(state["state"])
        return guide
    values = state["values"]
    num_data = values["locs"].size(0)
    dummy = torch.zeros(num_data, model.data_dim, dtype=values["locs"].dtype, device=values["locs"].device)
    if kind == "local-full":
        guide = make_guide(kind, model)
        guide._setup_prototype(dummy)
        names = {"locs": constraints.real, "scale_diags": constraints.softplus_positive,
                 "scale_offdiags": constraints.real}
    elif kind == "local-diag":
        guide = make_guide(kind, model)
        guide._setup_prototype(dummy)
        names = {"locs": constraints.real, "scales": guide.scale_constraint}
    else:
        raise ValueError(f"unknown guide kind {kind!r}")
    _check_store_free([param_fullname(getattr(guide, attribute), "z") for attribute in names])
    for attribute, constraint in names.items():
        deep_setattr(getattr(guide, attribute), "z", PyroParam(values[attribute], constraint, event_dim=1))
    return guide


# ---------------------------------------------------------------------- plain values


def _check_plain(value, where):
    """JSON-like values only: what weights_only loading accepts, and what a reader can trust."""
    if value is None or isinstance(value, (str, bool, numbers.Real)) and not isinstance(value, torch.Tensor):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} must have string keys, got {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise ValueError(f"{where} must be a number, string, bool, None, or a list or dict of those; "
                     f"got {type(value).__name__}")
