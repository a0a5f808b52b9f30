"""Restarts for :func:`~pyro_esc.fit` (``n_init``): fresh initialisations, and keeping the best run.

The ELBO of sparse coding has many local optima (a bar learned twice, another
never). As scikit-learn's KMeans does with ``n_init``, :func:`~pyro_esc.fit`
can train from several initialisations and keep the run with the best exact
ELBO. Restart ``i`` re-initialises with the RNG seeded ``seed + i``:

- the model draws a new dictionary: with ``init="data"`` (the default) its
  columns are other randomly chosen data points, with ``init="random"`` other
  random unit directions; lambda and sigma^2 restart from the data's scale;
- the guide starts again from its own initialisation (autoguides and
  :class:`~pyro_esc.LocalMultivariateNormal` set themselves up afresh,
  :class:`~pyro_esc.AmortizedNormal` redraws its weights).

Only the parameters that the run trains are touched in Pyro's param store.
"""

import torch

import pyro
from pyro.infer.autoguide import AutoGuide

from ..models.sparse_coding import SparseCoding


def check_restartable(model, guide):
    """Raise a ValueError unless :func:`reinitialize` knows how to restart ``model`` and ``guide``."""
    if not isinstance(model, SparseCoding):
        raise ValueError(f"n_init > 1 re-initialises a pyro_esc.SparseCoding model, got {type(model).__name__}")
    if not (isinstance(guide, AutoGuide) or callable(getattr(guide, "reset_parameters", None))):
        raise ValueError(f"n_init > 1 needs a guide that can be re-initialised: a Pyro autoguide, "
                         f"LocalMultivariateNormal, AmortizedNormal, or any guide with a reset_parameters() "
                         f"method; {type(guide).__name__} has none")


def reinitialize(model, guide, names, seed):
    """Forget the trained parameters ``names`` and let model and guide initialise again from ``seed``."""
    store = pyro.get_param_store()
    for name in names:
        if name in store:
            del store[name]
    pyro.set_rng_seed(seed)
    model.initialized.fill_(False)  # the next evaluation initialises from the data again
    if isinstance(guide, AutoGuide):
        guide.prototype_trace = None  # the next call sets the guide up afresh
    else:
        guide.reset_parameters()


def snapshot(names, model, guide):
    """Copies of the trained parameters (unconstrained, by name) and of the modules' states."""
    store = pyro.get_param_store()
    return {
        "params": {name: store[name].unconstrained().detach().clone() for name in names if name in store},
        "model": {key: value.clone() for key, value in model.state_dict().items()},
        "guide": ({key: value.clone() for key, value in guide.state_dict().items()}
                  if isinstance(guide, torch.nn.Module) else None),
    }


@torch.no_grad()
def restore(state, model, guide):
    """Write a :func:`snapshot` back in place (the run that made it must have the same parameters)."""
    store = pyro.get_param_store()
    for name, value in state["params"].items():
        store[name].unconstrained().copy_(value)
    model.load_state_dict(state["model"])
    if state["guide"] is not None:
        guide.load_state_dict(state["guide"])
