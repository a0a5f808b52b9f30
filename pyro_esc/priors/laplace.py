r"""The Laplace prior of sparse coding: p(z_h) = Laplace(z_h; 0, lambda_h).

::

    -log p(z_h) = log(2 lambda_h) + |z_h| / lambda_h        phi(z) = |z|
    lambda_h*   = 1/N sum_n E_q|z_h^(n)|                    (the paper's Theorem 2)
    H[p]        = sum_h log(2 e lambda_h)

Under a Gaussian q the statistic is the folded-normal mean ``E|z|`` of
:func:`pyro_esc.gaussian.folded_normal_mean`, with analytic derivatives.
"""

import math

import torch

from ..distributions.gaussian import LOG_2E, folded_normal_mean
from ..distributions.laplace import Laplace as LaplaceDistribution
from .base import Prior

_LOG_2 = math.log(2.0)
_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class Laplace(Prior):
    """Independent Laplace(0, lambda_h) latents: sparse coding's prior (the default).

    Example::

        >>> import torch
        >>> from pyro_esc.priors import Laplace
        >>> Laplace().optimal_scale(torch.tensor([0.5]))   # lambda* = E|z|
        tensor([0.5000])
    """

    name = "laplace"
    degree = 1

    def distribution(self, scale):
        return LaplaceDistribution(torch.zeros_like(scale), scale)

    def statistic(self, z):
        return z.abs()

    def log_normalizer(self, scale):
        return _LOG_2 + scale.log()

    def penalty(self, scale):
        return scale.reciprocal()

    def optimal_scale(self, mean_statistic):
        return mean_statistic

    def entropy(self, scale):
        return (LOG_2E + scale.log()).sum(-1)

    def cross_entropy(self, mean_statistic, scale):
        return (_LOG_2 + scale.log() + mean_statistic / scale).sum(-1)

    def expected_statistic(self, mean, scale):
        return folded_normal_mean(mean, scale)

    def statistic_derivatives(self, mean, scale):
        # E|z| = tau g + nu erf(nu / (sqrt 2 tau)) with g = sqrt(2/pi) exp(-nu^2 / (2 tau^2)):
        # d/dnu = erf, d/dtau = g, d2/dnu2 = g / tau, d2/dnu dtau = -g nu / tau^2, d2/dtau2 = g nu^2 / tau^3.
        ratio = mean / (scale * _SQRT_2)
        erf = torch.erf(ratio)
        density = torch.exp(-ratio.square()).mul_(_SQRT_2_OVER_PI)
        curvature = density / scale
        cross = -curvature * mean / scale
        return (scale * density + mean * erf, erf, density, curvature, cross, -cross * mean / scale)

    def scale_for_variance(self, variance):
        # Var Laplace(0, lambda) = 2 lambda^2.
        return (torch.as_tensor(variance) / 2).sqrt()

    def posterior_scale_at_zero_mean(self, penalty, curvature):
        # At nu = 0, dE|z|/dtau = sqrt(2/pi): the optimum solves 1 = p sqrt(2/pi) tau + k tau^2.
        linear = penalty * _SQRT_2_OVER_PI
        return 2 / (linear + (linear.square() + 4 * curvature).sqrt())
