"""fit's gradient routes in a standard range of data scales, so that their result does not depend on the units.

The model is scale-equivariant: data times c are explained by the same dictionary with lambda, sigma
and every posterior scaled by c, at the ELBO minus D log c per point. A gradient optimiser is not: it
sees the unit-free dictionary next to posterior means and scales in the data's units (Pyro's
``AutoNormal`` and :class:`~pyro_esc.LocalMultivariateNormal` start every scale at 0.1, an encoder its
outputs near 0 and 0.1, whatever the data), so the relative curvature of the blocks (L-BFGS) or the
size of a step against the posteriors' (Adam, whose steps are of the order of its learning rate in
the parameters' own units) changes with c. On 5x5 bars times 100 L-BFGS converged to the all-zero
code, times 255 it stalled at step 7, times 0.001 it turned NaN; SVI and the row-wise route explained
none of the data times 100.

So on every gradient route (:data:`GRADIENT_ROUTES`: L-BFGS, SVI, row-wise; EM's steps are exact
maximisations, unit-free by construction), with a guide that rescales exactly (a per-point Gaussian
guide, :func:`~pyro_esc.em.covariance_family`; an :class:`~pyro_esc.AmortizedNormal`, through its
``unit``; or one of Pyro's joint Gaussian autoguides, :data:`JOINT_AUTOGUIDES`), :func:`~pyro_esc.fit`
trains on ``x / unit``. ``unit`` (:func:`data_unit`) is 1 for data whose root mean square lies in the
range the routes' defaults were measured in (:data:`STANDARD_RANGE`, from whitened patches to bars:
every setting of the bars grid, BENCHMARKS.md "Bars over sizes, noise levels and seeds", and the
patches keep unit 1, and so their very path); otherwise it is the power of two that brings the root
mean square nearest to :data:`REFERENCE_RMS`, the bars' scale, on which L-BFGS's defaults were
measured. Why not the RMS itself: standardising the bars to RMS 1 (a factor 2) changed L-BFGS's path
enough to find every bar on 4 of 10 seeds at 5x5, noise 0.05, where the raw bars find them on 10 of 10
(BENCHMARKS.md, "Units"). A power of two divides exactly, so data outside the range and their
multiples by 2^k give the very same run (bars times 16 or 2^-10 run as the bars do); other factors c
reach the optimiser within a factor sqrt(2) of the reference, and give the same result where the
problem has a clear optimum. The model's lambda, sigma^2 and the guide (per-point Gaussians, an
encoder's unit, a joint Gaussian's means and scales) are rescaled into those units before
(:func:`rescale`; nothing to do for a model and guide that have not seen data yet) and back after,
exactly. ``History`` records in the data's own units throughout (its ``unit`` says which unit the
optimiser worked in), so progress bars, callbacks and checkpoints' histories show true values; the
model and guide that a callback sees during such a run are in the optimiser's units (the dictionary,
which has none, is the same).

Example::

    >>> import torch
    >>> from pyro_esc.standard_units import data_unit
    >>> data_unit(torch.full((4, 3), 2.0)), data_unit(torch.full((4, 3), 0.8)), data_unit(torch.full((4, 3), 255.0))
    (1.0, 1.0, 128.0)
"""

import contextlib
import math

import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal
from torch.distributions import transform_to

import pyro

from .._pyro_internals import param_constraint, param_fullname
from ..models.sparse_coding import SparseCoding
from ..variational.guides import AmortizedNormal, covariance_family
from .em import _Rows

__all__ = ["GRADIENT_ROUTES", "JOINT_AUTOGUIDES", "REFERENCE_RMS", "STANDARD_RANGE", "data_rms", "data_unit", "in_standard_units", "rescale",
           "rescales_exactly", "trains_in_standard_units"]


#: The root mean square of the bars data the L-BFGS route's defaults were measured on (5x5 bars with
#: Laplace(1) amplitudes: 2.03 at noise 0.1; every size and noise level of the grid: 2.03-2.06).
REFERENCE_RMS = 2.0

#: Data whose root mean square lies in ``[low, high)`` train as they are (unit 1): the range the routes'
#: defaults were measured in, from whitened patches (RMS 0.77-0.86: the encoders' widths; the row-wise route's
#: rate, chosen on patches and bars) to the bars (2.03-2.06: L-BFGS's tolerance, the SVI recipes), with room
#: below; above, the range in which L-BFGS's defaults hold (within a factor sqrt(2) of :data:`REFERENCE_RMS`) ends.
STANDARD_RANGE = (0.5, 2 * math.sqrt(2))


def data_rms(x):
    """sqrt(mean over points and dimensions of x^2), as a float (summed in float64)."""
    return math.sqrt(float(x.detach().to(torch.float64).square().mean()))


def data_unit(x):
    """The unit fit's gradient routes train in: 1 for data whose RMS lies in :data:`STANDARD_RANGE`, else
    the power of two 2^k nearest to ``data_rms(x) / REFERENCE_RMS`` (in log scale), which brings the RMS
    within a factor sqrt(2) of :data:`REFERENCE_RMS`, inside the range."""
    rms = data_rms(x)
    if not 0 < rms < math.inf or STANDARD_RANGE[0] <= rms < STANDARD_RANGE[1]:
        return 1.0
    return 2.0 ** round(math.log2(rms / REFERENCE_RMS))


#: The routes whose path depends on the data's units (EM's steps are exact maximisations: unit-free).
GRADIENT_ROUTES = ("torch", "svi", "rowwise")


#: Pyro's joint Gaussian autoguides (one Gaussian over all N H codes) and their parameters that carry the
#: data's units (times c for data times c); the rest (AutoMultivariateNormal's unit lower Cholesky factor)
#: carry none.
JOINT_AUTOGUIDES = {AutoDiagonalNormal: ("loc", "scale"), AutoMultivariateNormal: ("loc", "scale"),
                    AutoLowRankMultivariateNormal: ("loc", "scale", "cov_factor")}


def rescales_exactly(guide):
    """Whether :func:`rescale` can express ``guide`` for data in other units exactly: a per-point Gaussian
    guide (its rows scale), an :class:`~pyro_esc.AmortizedNormal` (its ``unit``) or one of Pyro's joint
    Gaussian autoguides (:data:`JOINT_AUTOGUIDES`; their means and scales)."""
    return (covariance_family(guide) is not None or isinstance(guide, AmortizedNormal)
            or type(guide) in JOINT_AUTOGUIDES)


def trains_in_standard_units(route, model, guide):
    """Whether fit trains this model and guide on ``x / data_unit(x)``: a gradient route (L-BFGS, SVI,
    row-wise), a :class:`~pyro_esc.SparseCoding` and a guide that rescales exactly (:func:`rescales_exactly`)."""
    return route in GRADIENT_ROUTES and isinstance(model, SparseCoding) and rescales_exactly(guide)


@torch.no_grad()
def rescale(model, guide, factor):
    """Express ``model`` and ``guide`` for data times ``factor``: lambda, every posterior (means and
    scales) times ``factor``, sigma^2 times ``factor^2``; the dictionary is unchanged.

    A model that has not been initialised from data and a guide that has not created its
    parameters (or an encoder that has not seen data) are left as they are: they will start from
    the data they first see.
    """
    if bool(model.initialized):
        prior_scale, noise_var = model.prior_scale.detach(), model.noise_var.detach()
        model.assign_scales(prior_scale * factor, noise_var * factor ** 2)
    family = covariance_family(guide)
    if family is not None and getattr(guide, "prototype_trace", None) is not None:
        rows = _Rows(guide, family)
        rows.rescale(torch.full((model.n_latents,), float(factor), dtype=rows.tensors[0].dtype,
                                device=rows.tensors[0].device))
    elif isinstance(guide, AmortizedNormal) and bool(guide.matched):
        guide.rescale(factor)
    elif type(guide) in JOINT_AUTOGUIDES and getattr(guide, "prototype_trace", None) is not None:
        _rescale_joint(guide, JOINT_AUTOGUIDES[type(guide)], float(factor))


def _rescale_joint(guide, names, factor):
    # In place on the store's unconstrained tensors (the module's are the same ones), as the per-point rows are.
    store = pyro.get_param_store()
    for name in names:
        fullname = param_fullname(guide, name)
        transform = transform_to(param_constraint(fullname))
        tensor = store[fullname].unconstrained()
        tensor.copy_(transform.inv(transform(tensor) * factor))


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
