"""One context for work that must leave the caller's Pyro state alone."""

import contextlib

import pyro
from pyro.util import get_rng_state, set_rng_state


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
    from ._pyro_internals import foreign_parameters

    taken = sorted({name for module in modules for name in foreign_parameters(module)})
    if taken:
        raise ValueError(
            f"Pyro's param store already holds {taken} for another model or guide of the same names: "
            f"training would start from its values and overwrite them. Build, train and use each model in a "
            f"param-store scope of its own (with pyro.get_param_store().scope(): ...), or call "
            f"pyro.clear_param_store() first if the earlier model is no longer needed")
