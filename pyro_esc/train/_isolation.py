"""One context for work that must leave the caller's Pyro state alone."""

import contextlib
import hashlib

import torch

import pyro
from pyro.util import get_rng_state, set_rng_state

from .._pyro_internals import own_parameters  # noqa: F401 - its home is the utilities; public here too


@contextlib.contextmanager
def isolated():
    """A param-store scope of its own, and the caller's RNG state (torch, numpy, random) restored after.

    Whatever is built inside (models, guides, their Pyro params) lives only there, so fits done
    on the caller's behalf (:func:`~pyro_esc.encode`, :func:`~pyro_esc.reference_elbo`,
    :func:`~pyro_esc.denoise`, the scikit-learn estimator) neither read nor change the caller's
    parameters or random stream.
    """
    rng = get_rng_state()
    try:
        with pyro.get_param_store().scope():
            yield
    finally:
        set_rng_state(rng)


def check_owns_its_parameters(*modules):
    """Refuse to train modules whose names in Pyro's param store hold another module's tensors.

    A PyroModule reads its parameters from the global param store by name, and adopts whatever
    tensor is stored there: a second ``SparseCoding`` (or guide) built in the same store would start
    from the first one's values and, training, overwrite them (the two then share one tensor). So a
    name of ``modules`` that the store holds must hold that module's own tensor, and a module
    whose parameters are created on first use (an autoguide not yet run) must find its namespace
    empty. Modules that are not PyroModules are not checked.

    :raises ValueError: naming the parameters and the fix.
    """
    from .._pyro_internals import foreign_parameters

    taken = sorted({name for module in modules for name in foreign_parameters(module)})
    if taken:
        raise ValueError(
            f"Pyro's param store already holds {taken} for another model or guide of the same names: "
            f"training would start from its values and overwrite them. Build, train and use each model in a "
            f"param-store scope of its own (with pyro.get_param_store().scope(): ...), or call "
            f"pyro.clear_param_store() first if the earlier model is no longer needed")


#: At most this many rows (evenly spaced) identify the data a per-point guide was fitted to.
_TIE_ROWS = 4096


def data_tie(x):
    """A cheap identity of the data a per-point guide holds posteriors for: shape and a hash of sampled rows."""
    stride = max(1, x.size(0) // _TIE_ROWS)
    rows = x.detach()[::stride].to("cpu", torch.float64).contiguous()
    return tuple(x.shape), hashlib.sha256(rows.numpy().tobytes()).hexdigest()


def tie_to_data(guide, x):
    """Record on a per-point guide that its posteriors are now those of ``x`` (fit does, before training)."""
    from ..variational.rows import offers_row_access

    if offers_row_access(guide):
        guide._pyro_esc_data = data_tie(x)


def check_tied_to(guide, x, where):
    """Refuse to evaluate a per-point guide on other data than the data it was fitted to."""
    tie = getattr(guide, "_pyro_esc_data", None)
    if tie is not None and tie != data_tie(x):
        raise ValueError(f"{where}: the guide holds posteriors for the {tie[0][0]} points it was fitted to, not "
                         f"for this x (other data of shape {tuple(x.shape)}); evaluate it on its own data, or "
                         f"solve posteriors for x first: held_out_elbo(model, encode(model, guide, x), x)")
