"""Posteriors for new data under a trained model, for every guide family: :func:`encode`.

An amortised guide encodes any data by construction. A per-point guide holds
one posterior per training point and none for new data; :func:`encode` solves
new ones with the trained model held fixed (:func:`~pyro_esc.solver.solve_posteriors`).
A joint guide (one Gaussian over all points) gets a new joint Gaussian over the
new points, fitted with the model fixed.
"""

import warnings

import torch

from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
)
from .._checks import check_data
from .._pyro_internals import own_parameters
from ..infer.objectives import AnalyticELBO
from ..infer.solver import DEFAULT_MAX_ITER, DEFAULT_TOL, solve_posteriors
from ..models.sparse_coding import SparseCoding
from ..train._isolation import isolated
from ..train.convergence import ConvergenceWarning
from ..train.loop import fit
from ..variational.guides import covariance_family
from ..variational.posterior import gaussian_posterior

__all__ = ["encode"]


def encode(model, guide, x, seed=0, tol=None, max_iter=None, **fit_options):
    r"""The Gaussian summary of q(z | x) for data ``x`` (e.g. held out) under a trained model.

    - An amortised guide (one with an ``encode`` method, such as
      :class:`~pyro_esc.AmortizedNormal`) runs its encoder: nothing is fitted. A
      :class:`~pyro_esc.SemiAmortized` guide also refines the encoder's posteriors with the model
      fixed (``SemiAmortized(encoder, model, steps=20, method="lbfgs")`` closes most of the
      amortisation gap; benchmarks/amortisation_gap.py measures it).
    - A per-point guide (:class:`~pyro_esc.LocalMultivariateNormal`: full covariances,
      ``AutoNormal``: diagonal) gets every new point's posterior of its family at its optimum,
      with the model held fixed at its trained dictionary W, lambda and sigma^2: the standard ELBO
      (:class:`~pyro_esc.AnalyticELBO`)

          sum_n E_q[log p(x^(n) | z) + log p(z)] + H[q^(n)]

      is maximised over each point's posterior by :func:`~pyro_esc.solver.solve_posteriors`
      (Newton's method, each point to its own tolerance ``tol``, in float64). A point's posterior
      does not depend on the other points of ``x``. Unlike :class:`~pyro_esc.EntropyELBO`, lambda
      and sigma^2 stay at their trained values: the new data are explained by the trained model.
    - A joint guide (``AutoDiagonalNormal``, ``AutoMultivariateNormal``,
      ``AutoLowRankMultivariateNormal``) gets a fresh guide of its family for the points of ``x``,
      fitted by :func:`~pyro_esc.fit` with L-BFGS in float64 and the model fixed (``fit_options``
      go to that fit; default ``tol=1e-9``), in a param-store scope of its own.

    The trained guide, the caller's param store and RNG are untouched. The result works wherever
    a guide is read through :func:`~pyro_esc.posterior.gaussian_posterior`:
    ``held_out_elbo(model, encode(model, guide, x_new), x_new)`` and
    ``log_likelihood(model, encode(model, guide, x_new), x_new)``.

    Example::

        >>> import torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyro_esc import SparseCoding, encode
        >>> model = SparseCoding(data_dim=4, n_latents=3)
        >>> _ = torch.manual_seed(0); model.set_dictionary(torch.randn(4, 3))
        >>> posterior = encode(model, AutoNormal(model, create_plates=model.create_plates), torch.randn(5, 4))
        >>> posterior.mean.shape
        torch.Size([5, 3])

    :param model: a trained :class:`~pyro_esc.SparseCoding` (not changed).
    :param guide: the trained guide; only its family is used for per-point and joint guides.
    :param x: data, shape (M, D).
    :param int seed: seed of a joint guide's initialisation.
    :param float tol: per-point guides: the solver's tolerance in nats per point (default
        :data:`~pyro_esc.solver.DEFAULT_TOL`).
    :param int max_iter: per-point guides: the solver's Newton iterations per point at most.
    :param fit_options: joint guides: further arguments of :func:`~pyro_esc.fit` for the refit.
    :returns: a :class:`~pyro_esc.GaussianPosterior` of M points in x's dtype, without gradient.
    :raises ValueError: for a model that is not a SparseCoding, data of the wrong width, options
        that do not apply to the guide, or a guide family it cannot refit (fit a new guide with
        ``fit(..., train_model=False)``).
    """
    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a trained pyro_esc.SparseCoding, got {type(model).__name__}")
    # The model's and the guide's own parameters, whatever the current param store holds under their names.
    with own_parameters(model, guide):
        return _encode(model, guide, x, seed, tol, max_iter, fit_options)


def _encode(model, guide, x, seed, tol, max_iter, fit_options):
    x = check_data(x, "x", allow_numpy=True)
    if not x.is_floating_point():
        x = x.to(model.dictionary.dtype)
    if x.size(1) != model.data_dim:
        raise ValueError(f"x must have D = {model.data_dim} columns (the model's data_dim), got {x.size(1)}")
    if callable(getattr(guide, "encode", None)) and not isinstance(guide, AutoGuide):
        with torch.no_grad():
            return gaussian_posterior(guide, x).detach()
    family = covariance_family(guide)
    if family is not None:
        if fit_options:
            raise ValueError(f"encode solves a {type(guide).__name__}'s posteriors with solve_posteriors, which "
                             f"takes tol and max_iter; {sorted(fit_options)} apply to joint guides only")
        solved = solve_posteriors(model, x, family, tol=DEFAULT_TOL if tol is None else tol,
                                  max_iter=DEFAULT_MAX_ITER if max_iter is None else max_iter)
        unconverged = int((~solved.converged).sum())
        if unconverged:
            warnings.warn(f"encode: {unconverged} of {x.size(0)} points did not meet tol within max_iter "
                          f"Newton iterations; pass a larger max_iter or tol", ConvergenceWarning, stacklevel=2)
        return solved.posterior
    make_guide = _fresh_guide(guide)
    if tol is not None:
        fit_options.setdefault("tol", tol)
    if max_iter is not None:
        fit_options.setdefault("steps", max_iter)
    fit_options.setdefault("tol", 1e-9)
    fit_options.setdefault("progress", False)
    with isolated():
        fixed = fixed_copy(model, torch.float64, x.device)
        new_guide = make_guide(fixed)
        x64 = x.to(torch.float64)
        _fit(fixed, new_guide, x64, seed, fit_options)
        with torch.no_grad():
            posterior = gaussian_posterior(new_guide, x64).detach()
    return posterior.to(x.dtype)


def _fit(model, guide, x, seed, fit_options):
    return fit(model, guide, x, loss=AnalyticELBO(), optimizer="lbfgs", train_model=False, seed=seed, **fit_options)


def fixed_copy(model, dtype, device):
    """A separate SparseCoding with ``model``'s W, lambda, sigma^2: nothing a fit does to it touches ``model``."""
    with torch.no_grad():
        copy = SparseCoding(model.data_dim, model.n_latents, prior=model.prior).to(dtype=dtype, device=device)
        copy.set_dictionary(model.dictionary.detach().to(dtype=dtype, device=device))
        copy.set_scales(model.prior_scale.detach().to(dtype=dtype, device=device),
                        model.noise_var.detach().to(dtype=dtype, device=device))
    return copy


def _fresh_guide(guide):
    """A factory ``model -> guide`` of a joint guide's family for new data."""
    if type(guide) in (AutoDiagonalNormal, AutoMultivariateNormal):
        return type(guide)
    if type(guide) is AutoLowRankMultivariateNormal:
        return lambda model: AutoLowRankMultivariateNormal(model, rank=guide.rank)
    raise ValueError(f"encode does not know how to build a {type(guide).__name__} for new data: it encodes with "
                     f"amortised guides (an encode method), solves LocalMultivariateNormal and AutoNormal "
                     f"posteriors and refits AutoDiagonalNormal, AutoMultivariateNormal and "
                     f"AutoLowRankMultivariateNormal. For another "
                     f"guide, build one for the new data and train it with fit(model, new_guide, x, "
                     f"loss=AnalyticELBO(), train_model=False)")
