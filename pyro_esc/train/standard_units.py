"""fit's L-BFGS route in a standard range of data scales, so that its result does not depend on the units.

The model is scale-equivariant: data times c are explained by the same dictionary with lambda, sigma
and every posterior scaled by c, at the ELBO minus D log c per point. An optimiser is not: L-BFGS sees
the unit-free dictionary next to posterior means and scales in the data's units (Pyro's ``AutoNormal``
and :class:`~pyro_esc.LocalMultivariateNormal` start every scale at 0.1, whatever the data), so the
relative curvature of the two blocks, and with it the path, changes with c^2. On 5x5 bars times 100
L-BFGS converged to the all-zero code, times 255 it stalled at step 7, times 0.001 it turned NaN.

So with a per-point Gaussian guide (the families the solver knows, :func:`~pyro_esc.em.covariance_family`)
:func:`~pyro_esc.fit`'s torch route trains on ``x / unit``, where ``unit`` (:func:`data_unit`) is the
power of two that brings the data's root mean square nearest to :data:`REFERENCE_RMS`, the scale of the
bars data on which the route's defaults were measured (BENCHMARKS.md, "Bars over sizes, noise levels
and seeds"; every setting of that grid keeps unit 1, and so its very path). Why not the RMS itself:
standardising the bars to RMS 1 (a factor 2) changed L-BFGS's path enough to find every bar on 4 of 10
seeds at 5x5, noise 0.05, where the raw bars find them on 10 of 10 (BENCHMARKS.md, "Units"). A power
of two divides exactly, so data times 2^k give the very same run; other factors c reach the optimiser
at a scale within a factor sqrt(2) of the reference, and give the same result where the problem has a
clear optimum. The model's lambda, sigma^2 and the guide's per-point Gaussians are rescaled into those
units before (:func:`rescale`; nothing to do for a model and guide that have not seen data yet) and back
after, exactly. ``History`` records in the data's own units throughout (its ``unit`` says which unit
the optimiser worked in), so progress bars, callbacks and checkpoints' histories show true values; the
model and guide that a callback sees during such a run are in the optimiser's units (the dictionary,
which has none, is the same).

Example::

    >>> import torch
    >>> from pyro_esc.standard_units import data_unit
    >>> data_unit(torch.full((4, 3), 2.0)), data_unit(torch.full((4, 3), 255.0))
    (1.0, 128.0)
"""

import contextlib
import math

import torch

from ..models.sparse_coding import SparseCoding
from ..variational.guides import covariance_family
from .em import _Rows

__all__ = ["REFERENCE_RMS", "data_rms", "data_unit", "in_standard_units", "rescale", "trains_in_standard_units"]


#: The root mean square of the bars data the L-BFGS route's defaults were measured on (5x5 bars with
#: Laplace(1) amplitudes: 2.03 at noise 0.1; every size and noise level of the grid: 2.03-2.06).
REFERENCE_RMS = 2.0


def data_rms(x):
    """sqrt(mean over points and dimensions of x^2), as a float (summed in float64)."""
    return math.sqrt(float(x.detach().to(torch.float64).square().mean()))


def data_unit(x):
    """The power of two 2^k nearest to ``data_rms(x) / REFERENCE_RMS`` (in log scale): the unit the
    L-BFGS route trains in. 1 for data whose RMS is within a factor sqrt(2) of :data:`REFERENCE_RMS`."""
    rms = data_rms(x)
    if not 0 < rms < math.inf:
        return 1.0
    return 2.0 ** round(math.log2(rms / REFERENCE_RMS))


def trains_in_standard_units(route, model, guide):
    """Whether fit trains this model and guide on ``x / data_unit(x)``: the torch route, a
    :class:`~pyro_esc.SparseCoding` and a per-point Gaussian guide (whose rows rescale exactly)."""
    return route == "torch" and isinstance(model, SparseCoding) and covariance_family(guide) is not None


@torch.no_grad()
def rescale(model, guide, factor):
    """Express ``model`` and ``guide`` for data times ``factor``: lambda, every posterior (means and
    scales) times ``factor``, sigma^2 times ``factor^2``; the dictionary is unchanged.

    A model that has not been initialised from data and a guide that has not created its
    parameters are left as they are: they will start from the data they first see.
    """
    if bool(model.initialized):
        prior_scale, noise_var = model.prior_scale.detach(), model.noise_var.detach()
        model.assign_scales(prior_scale * factor, noise_var * factor ** 2)
    family = covariance_family(guide)
    if family is not None and getattr(guide, "prototype_trace", None) is not None:
        rows = _Rows(guide, family)
        rows.rescale(torch.full((model.n_latents,), float(factor), dtype=rows.tensors[0].dtype,
                                device=rows.tensors[0].device))


@contextlib.contextmanager
def in_standard_units(model, guide, unit):
    """``with in_standard_units(model, guide, unit):`` model and guide in units of ``unit`` inside, back after.

    Leaving restores the caller's units even when training raised (a NaN stop, an interruption),
    so the model and guide handed back are always in the data's own units.
    """
    rescale(model, guide, 1 / unit)
    try:
        yield
    finally:
        rescale(model, guide, unit)
