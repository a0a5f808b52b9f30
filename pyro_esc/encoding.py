"""Posteriors for new data under a trained model, for every guide family: :func:`encode`.

An amortised guide encodes any data by construction. A per-point guide holds
one posterior per training point and none for new data; :func:`encode` fits
new ones with the trained model held fixed. A joint guide (one Gaussian over
all points) gets a new joint Gaussian over the new points the same way.
"""

import torch

from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from ._checks import check_data
from ._isolation import isolated
from .guides import LocalMultivariateNormal
from .model import SparseCoding
from .objectives import AnalyticELBO
from .posterior import gaussian_posterior

__all__ = ["encode"]


def encode(model, guide, x, seed=0, **fit_options):
    r"""The Gaussian summary of q(z | x) for data ``x`` (e.g. held out) under a trained model.

    - An amortised guide (one with an ``encode`` method, such as
      :class:`~pyro_esc.AmortizedNormal`) runs its encoder: nothing is fitted. A
      :class:`~pyro_esc.SemiAmortized` guide also refines the encoder's posteriors with the model
      fixed (``SemiAmortized(encoder, model, steps=20, method="lbfgs")`` closes most of the
      amortisation gap; benchmarks/amortisation_gap.py measures it).
    - A per-point guide (:class:`~pyro_esc.LocalMultivariateNormal`, ``AutoNormal``) or a joint
      one (``AutoDiagonalNormal``, ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``)
      gets a fresh guide of its family for the points of ``x``, fitted with the model held
      fixed at its trained dictionary W, lambda and sigma^2: the standard ELBO
      (:class:`~pyro_esc.AnalyticELBO`)

          sum_n E_q[log p(x^(n) | z) + log p(z)] + H[q^(n)]

      is maximised over the new posteriors only, by L-BFGS to convergence, in float64, in a
      param-store scope of its own (the trained guide and the caller's RNG are untouched).
      The ELBO is a sum over points, so each point's posterior is its own optimum whatever
      else is in ``x``. Unlike :class:`~pyro_esc.EntropyELBO`, lambda and sigma^2 stay at
      their trained values: the new data are explained by the trained model.

    The result works wherever a guide is read through
    :func:`~pyro_esc.posterior.gaussian_posterior`:
    ``held_out_elbo(model, encode(model, guide, x_new), x_new)`` and
    ``log_likelihood(model, encode(model, guide, x_new), x_new)``.

    :param model: a trained :class:`~pyro_esc.SparseCoding` (not changed).
    :param guide: the trained guide; only its family is used for per-point and joint guides.
    :param x: data, shape (M, D).
    :param int seed: seed of the fresh guide's initialisation.
    :param fit_options: further arguments of :func:`~pyro_esc.fit` for the fit (default ``tol=1e-9``).
    :returns: a :class:`~pyro_esc.GaussianPosterior` of M points in x's dtype, without gradient.
    :raises ValueError: for a model that is not a SparseCoding, data of the wrong width, or a
        guide family it cannot refit (fit a new guide with ``fit(..., train_model=False)``).
    """
    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a trained pyro_esc.SparseCoding, got {type(model).__name__}")
    x = check_data(x, "x", allow_numpy=True)
    if not x.is_floating_point():
        x = x.to(model.dictionary.dtype)
    if x.size(1) != model.data_dim:
        raise ValueError(f"x must have D = {model.data_dim} columns (the model's data_dim), got {x.size(1)}")
    if callable(getattr(guide, "encode", None)) and not isinstance(guide, AutoGuide):
        with torch.no_grad():
            return gaussian_posterior(guide, x).detach()
    make_guide = _fresh_guide(guide)
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
    from .training import fit

    return fit(model, guide, x, loss=AnalyticELBO(), optimizer="lbfgs", train_model=False, seed=seed, **fit_options)


def fixed_copy(model, dtype, device):
    """A separate SparseCoding with ``model``'s W, lambda, sigma^2: nothing a fit does to it touches ``model``."""
    with torch.no_grad():
        copy = SparseCoding(model.data_dim, model.n_latents).to(dtype=dtype, device=device)
        copy.set_dictionary(model.dictionary.detach().to(dtype=dtype, device=device))
        copy.set_scales(model.prior_scale.detach().to(dtype=dtype, device=device),
                        model.noise_var.detach().to(dtype=dtype, device=device))
    return copy


def _fresh_guide(guide):
    """A factory ``model -> guide`` of ``guide``'s family for new data."""
    if isinstance(guide, LocalMultivariateNormal):
        return lambda model: LocalMultivariateNormal(model, init_scale=guide._init_scale)
    if type(guide) is AutoNormal:
        return lambda model: AutoNormal(model, create_plates=model.create_plates)
    if type(guide) in (AutoDiagonalNormal, AutoMultivariateNormal):
        return type(guide)
    if type(guide) is AutoLowRankMultivariateNormal:
        return lambda model: AutoLowRankMultivariateNormal(model, rank=guide.rank)
    raise ValueError(f"encode does not know how to build a {type(guide).__name__} for new data: it encodes with "
                     f"amortised guides (an encode method) and refits LocalMultivariateNormal, AutoNormal, "
                     f"AutoDiagonalNormal, AutoMultivariateNormal and AutoLowRankMultivariateNormal. For another "
                     f"guide, build one for the new data and train it with fit(model, new_guide, x, "
                     f"loss=AnalyticELBO(), train_model=False)")
