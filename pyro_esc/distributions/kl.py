"""Closed-form KL divergences from Gaussians to the Laplace prior, registered with torch.

Importing :mod:`pyro_esc` registers them with
:func:`torch.distributions.kl.register_kl`, so Pyro's
:class:`~pyro.infer.TraceMeanField_ELBO` integrates the prior term of
:class:`~pyro_esc.SparseCoding` analytically (and samples only the likelihood
term) for guides whose ``"z"`` site is Gaussian. For q = Normal(nu, T) and
p = prod_h Laplace(m_h, b_h)::

    KL(q || p) = -H[q] - E_q[log p(z)]
               = -H[q] + sum_h [ log(2 b_h) + E_q|z_h - m_h| / b_h ]

with the folded-normal mean E|z_h - m_h| (docs/theory.md, Gaussian posteriors)
(:func:`~pyro_esc.gaussian.laplace_cross_entropy`); only the marginal
variances T_hh enter the second term, so the same formula serves diagonal,
full and low-rank covariances.

What is registered, and why:

- ``(pyro.distributions.Normal, pyro.distributions.Laplace)``: elementwise
  KL. PyTorch itself has had a ``(Normal, Laplace)`` rule since release 1.11
  (pytorch/pytorch#68807), with the same value; it is kept for torch's own
  classes. Pyro's classes (which the model and Pyro's guides use) get this one
  because it computes E|z| with :func:`~pyro_esc.gaussian.folded_normal_mean`,
  whose gradients stay finite for tiny scales where torch's formula gives NaN
  (e.g. float32, scale 1e-20). Like that function it is once differentiable.
  Together with Pyro's ``(Independent, Independent)`` rule this covers a guide
  site ``Normal(loc, scale).to_event(1)`` against the model's
  ``Laplace(0, lambda).to_event(1)``.
- ``(MultivariateNormal, Independent)`` and
  ``(LowRankMultivariateNormal, Independent)``: a correlated Gaussian against
  independent Laplace latents (``Independent(Laplace, 1)``), which neither
  torch nor Pyro has. Any other base distribution raises NotImplementedError,
  as before, so KL lookups and TraceMeanField_ELBO's sampling fallback behave
  as without this module.

Pyro's autoguides (AutoNormal, AutoMultivariateNormal, ...) do **not** benefit:
their ``"z"`` site is a Delta at the value of an auxiliary Gaussian site, so
TraceMeanField_ELBO finds KL(Delta || p) = -log p(z) (a sampled term) and
estimates exactly what Trace_ELBO estimates. A guide whose ``"z"`` site is
itself the Gaussian (a per-point ``Normal(...).to_event(1)`` or
``MultivariateNormal`` inside the ``"data"`` plate) gets the analytic term.
"""

import torch
import torch.distributions as tdist
from torch.distributions import register_kl

import pyro.distributions as dist

from .gaussian import entropy_from_low_rank, entropy_from_scale, entropy_from_scale_tril, laplace_cross_entropy


def kl_normal_laplace(q, p):
    """KL(q || p) for q = Normal(nu, tau^2) and p = Laplace(m, b), elementwise (batch shape broadcast).

    ::

        KL = -H[q] + log(2 b) + E_q|z - m| / b
           = log(b / tau) - 1/2 log(2 pi e) + log 2 + E_q|z - m| / b

    :param torch.distributions.Normal q: the Gaussian.
    :param torch.distributions.Laplace p: the Laplace distribution.
    """
    _check_type(q, tdist.Normal, "q")
    _check_type(p, tdist.Laplace, "p")
    # A trailing dimension of size 1 makes the summed closed forms elementwise.
    loc, scale, prior_loc, prior_scale = (value.unsqueeze(-1) for value in
                                          torch.broadcast_tensors(q.loc, q.scale, p.loc, p.scale))
    return laplace_cross_entropy(loc, scale, prior_scale, prior_loc) - entropy_from_scale(scale)


def _check_type(value, expected, name):
    if not isinstance(value, expected):
        raise ValueError(f"{name} must be a {expected.__name__} distribution, got {type(value).__name__}")


def _independent_laplace(p, event_shape):
    # The Laplace base of p = Independent(Laplace, 1) with event shape (H,), or None.
    base = p.base_dist
    if not isinstance(base, tdist.Laplace) or p.reinterpreted_batch_ndims != 1 or p.event_shape != event_shape:
        return None
    return base


def _kl_gaussian_independent_laplace(q, p, entropy):
    _check_type(p, tdist.Independent, "p")
    base = _independent_laplace(p, q.event_shape)
    if base is None:
        raise NotImplementedError(f"no closed-form KL from {type(q).__name__} to Independent("
                                  f"{type(p.base_dist).__name__}, {p.reinterpreted_batch_ndims})")
    return laplace_cross_entropy(q.mean, q.variance.sqrt(), base.scale, base.loc) - entropy


def kl_mvn_independent_laplace(q, p):
    """KL(q || p) for q = MultivariateNormal(nu, T) and p = Independent(Laplace(m, b), 1), per batch element.

    ::

        KL = -1/2 log det(2 pi e T) + sum_h [ log(2 b_h) + E|z_h - m_h| / b_h ],  z_h ~ Normal(nu_h, T_hh)

    :raises NotImplementedError: if p is not Independent(Laplace, 1) over q's event shape.
    """
    _check_type(q, tdist.MultivariateNormal, "q")
    return _kl_gaussian_independent_laplace(q, p, entropy_from_scale_tril(q.scale_tril))


def kl_low_rank_independent_laplace(q, p):
    """KL(q || p) for q = LowRankMultivariateNormal(nu, F, d) and p = Independent(Laplace(m, b), 1).

    ::

        KL = -1/2 log det(2 pi e (F F^T + diag d)) + sum_h [ log(2 b_h) + E|z_h - m_h| / b_h ]

    :raises NotImplementedError: if p is not Independent(Laplace, 1) over q's event shape.
    """
    _check_type(q, tdist.LowRankMultivariateNormal, "q")
    return _kl_gaussian_independent_laplace(q, p, entropy_from_low_rank(q.cov_factor, q.cov_diag))


register_kl(dist.Normal, dist.Laplace)(kl_normal_laplace)
register_kl(tdist.MultivariateNormal, tdist.Independent)(kl_mvn_independent_laplace)
register_kl(tdist.LowRankMultivariateNormal, tdist.Independent)(kl_low_rank_independent_laplace)

__all__ = [
    "kl_low_rank_independent_laplace",
    "kl_mvn_independent_laplace",
    "kl_normal_laplace",
]
