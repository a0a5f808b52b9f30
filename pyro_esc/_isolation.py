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
