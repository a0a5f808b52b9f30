"""Closed-form Gaussian quantities: the one place where entropies, E|z| and
expected reconstruction errors are computed (docs/theory.md, Gaussian posteriors).

Everything else in the package calls these functions; nothing recomputes an
entropy or a folded-normal mean on its own.

Notation: a Gaussian q(z) = Normal(nu, T) over z in R^H with T = L L^T
(L lower triangular), marginal scales tau_h = sqrt(T_hh).
"""

import math

import torch
from torch.autograd.function import once_differentiable

#: log(2 pi e), the per-dimension constant of a Gaussian entropy.
LOG_2PI_E = math.log(2 * math.pi * math.e)
#: log(2 e), the per-dimension constant of a Laplace entropy.
LOG_2E = math.log(2 * math.e)
#: log(2 pi), the per-dimension constant of a Gaussian log-normaliser.
LOG_2PI = math.log(2 * math.pi)

_LOG_2 = math.log(2.0)

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def entropy_from_scale(scale):
    """Entropy of diagonal Gaussians, summed over the last dimension.

    ::

        H[q] = H/2 log(2 pi e) + sum_h log tau_h

    :param torch.Tensor scale: standard deviations tau, shape (..., H).
    :returns: entropies, shape (...).
    """
    return 0.5 * scale.size(-1) * LOG_2PI_E + scale.log().sum(-1)


def entropy_from_scale_tril(scale_tril):
    """Entropy of Gaussians given a Cholesky factor of the covariance.

    ::

        H[q] = 1/2 log det(2 pi e T) = H/2 log(2 pi e) + sum_h log |L_hh|

    The absolute value makes the result independent of the signs of L's
    columns, which do not change T = L L^T.

    :param torch.Tensor scale_tril: lower-triangular factors L, shape (..., H, H).
    :returns: entropies, shape (...).
    """
    diag = scale_tril.diagonal(dim1=-2, dim2=-1)
    return 0.5 * scale_tril.size(-1) * LOG_2PI_E + diag.abs().log().sum(-1)


def low_rank_log_det(cov_factor, cov_diag):
    """log det(F F^T + diag(d)) by the matrix determinant lemma.

    ::

        log det(F F^T + D) = sum log d + log det(I_R + F^T D^-1 F)

    costs O(H R^2) instead of O(H^3).

    :param torch.Tensor cov_factor: F, shape (..., H, R).
    :param torch.Tensor cov_diag: d > 0, shape (..., H).
    :returns: log-determinants, shape (...).
    """
    scaled = cov_factor / cov_diag.sqrt().unsqueeze(-1)
    rank = cov_factor.size(-1)
    eye = torch.eye(rank, dtype=cov_factor.dtype, device=cov_factor.device)
    capacitance = eye + scaled.transpose(-1, -2) @ scaled
    capacitance_tril = torch.linalg.cholesky(capacitance)
    return cov_diag.log().sum(-1) + 2 * capacitance_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def entropy_from_low_rank(cov_factor, cov_diag):
    """Entropy of Gaussians with covariance F F^T + diag(d).

    :param torch.Tensor cov_factor: F, shape (..., H, R).
    :param torch.Tensor cov_diag: d > 0, shape (..., H).
    :returns: entropies, shape (...).
    """
    return 0.5 * cov_diag.size(-1) * LOG_2PI_E + 0.5 * low_rank_log_det(cov_factor, cov_diag)


def laplace_entropy(scale):
    """Entropy of independent Laplace(0, lambda_h), summed: sum_h log(2 e lambda_h).

    :param torch.Tensor scale: lambda, shape (..., H).
    """
    return (LOG_2E + scale.log()).sum(-1)


def isotropic_normal_entropy(variance, dim):
    """Entropy of Normal(mu, sigma^2 I_D): D/2 log(2 pi e sigma^2).

    :param torch.Tensor variance: sigma^2 (any shape).
    :param int dim: D.
    """
    return 0.5 * dim * (LOG_2PI_E + variance.log())


def normal_log_normalizer(variance, dim):
    """Log of the normalising constant of an isotropic Gaussian Normal(mu, sigma^2 I_D).

    ::

        log Normal(x; mu, sigma^2 I_D) = normal_log_normalizer(sigma^2, D) - ||x - mu||^2 / (2 sigma^2)
        normal_log_normalizer(sigma^2, D) = -D/2 log(2 pi sigma^2)

    :param torch.Tensor variance: sigma^2 > 0 (any shape; a Python number is accepted).
    :param int dim: D.
    :returns: a tensor of ``variance``'s shape.
    """
    return -0.5 * dim * (LOG_2PI + torch.as_tensor(variance).log())


class _FoldedNormalMean(torch.autograd.Function):
    """E|z| for z ~ Normal(nu, tau^2) with exact, everywhere-finite gradients.

    Autograd through the textbook formula produces 0 * inf = NaN once
    nu / tau^2 overflows (tiny tau); the analytic derivatives do not::

        d E|z| / d nu  = erf(nu / (sqrt(2) tau))
        d E|z| / d tau = sqrt(2/pi) exp(-nu^2 / (2 tau^2))

    Both are by-products of the forward pass and are saved for the backward
    pass, which is then two multiplications. That makes the backward pass
    once-differentiable: asking for second derivatives raises an error.
    """

    @staticmethod
    def forward(ctx, loc, scale):
        # A zero scale is the limit of a point mass: the ratio is then +-inf (or 0
        # at loc = 0), which erf and exp handle exactly, instead of 0/0 = NaN.
        ratio = loc / scale.clamp_min(torch.finfo(scale.dtype).tiny).mul(_SQRT_2)
        grad_loc = torch.erf(ratio)
        grad_scale = ratio.square_().neg_().exp_().mul_(_SQRT_2_OVER_PI)
        ctx.save_for_backward(grad_loc, grad_scale)
        return torch.addcmul(scale * grad_scale, loc, grad_loc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_loc, grad_scale = ctx.saved_tensors
        return grad_output * grad_loc, grad_output * grad_scale


def folded_normal_mean(loc, scale):
    """Mean of ``|z|`` for z ~ Normal(loc, scale^2) (the folded-normal mean).

    ::

        E|z| = tau sqrt(2/pi) exp(-nu^2 / (2 tau^2)) + nu erf(nu / (sqrt(2) tau))

    It tends to ``|nu|`` as tau -> 0 and equals tau sqrt(2/pi) at nu = 0. The value is
    exact for scale = 0 and for ``|nu| / tau`` up to overflow; gradients are finite
    everywhere, including nu = 0 and tiny tau.

    :param torch.Tensor loc: nu (broadcastable with ``scale``).
    :param torch.Tensor scale: tau >= 0.
    """
    # Broadcasting before the Function lets autograd reduce gradients to the inputs' shapes.
    if loc.shape != scale.shape:
        loc, scale = torch.broadcast_tensors(loc, scale)
    return _FoldedNormalMean.apply(loc, scale)


def laplace_cross_entropy_from_abs_mean(abs_mean, prior_scale):
    """Cross-entropy of any q against independent Laplace(0, lambda_h) latents, given E_q|z_h|.

    ::

        E_q[-log prod_h Laplace(z_h; 0, lambda_h)] = sum_h [ log(2 lambda_h) + E_q|z_h| / lambda_h ]

    Only the mean absolute values of q's marginals enter. Summed over the last
    dimension; the other dimensions broadcast. For a Gaussian q use
    :func:`laplace_cross_entropy`.

    :param torch.Tensor abs_mean: E_q|z_h|, shape (..., H).
    :param torch.Tensor prior_scale: lambda > 0, shape (..., H) (e.g. (H,)).
    :returns: shape (...).
    """
    return (_LOG_2 + prior_scale.log() + abs_mean / prior_scale).sum(-1)


def laplace_cross_entropy(loc, scale, prior_scale, prior_loc=None):
    """Cross-entropy of Gaussian marginals against independent Laplace latents.

    ::

        E_q[-log prod_h Laplace(z_h; m_h, lambda_h)] = sum_h [ log(2 lambda_h) + E|z_h - m_h| / lambda_h ],
        z_h ~ Normal(nu_h, tau_h^2)

    with the folded-normal mean E|z_h - m_h| of :func:`folded_normal_mean` (so
    gradients stay finite for tiny tau). Only the marginal scales tau_h enter,
    so the value holds for any covariance with diagonal tau^2. Summed over the
    last dimension; the other dimensions broadcast. For elementwise values,
    give every argument a trailing dimension of size 1.

    :param torch.Tensor loc: nu, shape (..., H).
    :param torch.Tensor scale: tau >= 0, shape (..., H).
    :param torch.Tensor prior_scale: lambda > 0, shape (..., H).
    :param torch.Tensor prior_loc: m, shape (..., H); default 0.
    :returns: shape (...).
    """
    if prior_loc is not None:
        loc = loc - prior_loc
    return laplace_cross_entropy_from_abs_mean(folded_normal_mean(loc, scale), prior_scale)


def expected_squared_errors(x, dictionary, mean, trace_terms):
    """Per data point, E_q||x - W z||^2 = ||x - W nu||^2 + tr(W T W^T).

    :param torch.Tensor x: data, shape (B, D).
    :param torch.Tensor dictionary: W, shape (D, H).
    :param torch.Tensor mean: posterior means nu, shape (B, H).
    :param torch.Tensor trace_terms: tr(W T_n W^T) per point, shape (B,) (see
        :meth:`pyro_esc.posterior.GaussianPosterior.trace_terms`).
    :returns: shape (B,).
    """
    return (x - mean @ dictionary.T).square().sum(-1) + trace_terms


def expected_squared_error(x, dictionary, mean, trace_term):
    """Sum over data points of E_q||x - W z||^2.

    ::

        sum_n E||x_n - W z||^2 = sum_n ||x_n - W nu_n||^2 + sum_n tr(W T_n W^T)

    :param torch.Tensor x: data, shape (B, D).
    :param torch.Tensor dictionary: W, shape (D, H).
    :param torch.Tensor mean: posterior means nu, shape (B, H).
    :param torch.Tensor trace_term: sum_n tr(W T_n W^T), a scalar (see
        :meth:`pyro_esc.posterior.GaussianPosterior.trace_term`).
    """
    residual = x - mean @ dictionary.T
    return residual.square().sum() + trace_term


def trace_of_product(gram, covariance):
    """tr(G T) for symmetric G and covariances T (batched): sum_ij G_ij T_ij."""
    return (gram * covariance).sum((-2, -1))
