r"""The Gaussian prior: p(z_h) = Normal(z_h; 0, s_h^2). With it the model is probabilistic PCA.

::

    -log p(z_h) = log(2 pi s_h^2) / 2 + z_h^2 / (2 s_h^2)   phi(z) = z^2
    s_h*^2      = 1/N sum_n E_q[z_h^(n) 2]
    H[p]        = sum_h log(2 pi e s_h^2) / 2

The true posterior of every point is Gaussian, so with a full-covariance guide the ELBO can
reach the log-likelihood itself, and the maximum-likelihood model is known in closed form
(Tipping & Bishop 1999; :func:`pyro_esc.evaluate.ppca.ppca_log_likelihood`).
"""


import torch

import pyro.distributions as dist

from ..distributions.gaussian import LOG_2PI, LOG_2PI_E
from .base import Prior


class Gaussian(Prior):
    """Independent Normal(0, s_h^2) latents: probabilistic PCA (``prior_scale`` is the standard deviation s).

    Example::

        >>> import torch
        >>> from pyro_esc.priors import Gaussian
        >>> Gaussian().optimal_scale(torch.tensor([4.0]))   # s* = sqrt(E[z^2])
        tensor([2.])
    """

    name = "gaussian"
    degree = 2

    def distribution(self, scale):
        return dist.Normal(torch.zeros_like(scale), scale)

    def statistic(self, z):
        return z.square()

    def log_normalizer(self, scale):
        return 0.5 * LOG_2PI + scale.log()

    def penalty(self, scale):
        return 0.5 * scale.square().reciprocal()

    def optimal_scale(self, mean_statistic):
        return mean_statistic.sqrt()

    def entropy(self, scale):
        return (0.5 * LOG_2PI_E + scale.log()).sum(-1)

    def expected_statistic(self, mean, scale):
        return mean.square() + scale.square()

    def statistic_derivatives(self, mean, scale):
        two = torch.full_like(mean, 2.0)
        return (mean.square() + scale.square(), 2 * mean, 2 * scale, two, torch.zeros_like(mean), two)

    def scale_for_variance(self, variance):
        return torch.as_tensor(variance).sqrt()

    def posterior_scale_at_zero_mean(self, penalty, curvature):
        # 1 / tau = 2 p tau + k tau: the exact posterior variance 1 / (1 / s^2 + G_hh / sigma^2).
        return (2 * penalty + curvature).rsqrt()


