"""Closed-form Gaussian quantities against Monte Carlo, torch.distributions and limits."""

import math

import pytest
import torch

import pyro.distributions as dist
from pyro_esc.gaussian import (
    entropy_from_low_rank,
    entropy_from_scale,
    entropy_from_scale_tril,
    expected_squared_error,
    folded_normal_mean,
    isotropic_normal_entropy,
    laplace_cross_entropy,
    laplace_cross_entropy_from_abs_mean,
    laplace_entropy,
    low_rank_log_det,
    normal_log_normalizer,
)


def test_folded_normal_mean_matches_monte_carlo(float64):
    loc = torch.tensor([-2.0, -0.3, 0.0, 0.1, 1.5, 4.0])
    scale = torch.tensor([0.5, 1.0, 2.0, 0.05, 3.0, 1.0])
    samples = dist.Normal(loc, scale).sample((400_000,)).abs()
    mc_mean = samples.mean(0)
    mc_se = samples.std(0) / math.sqrt(samples.size(0))
    assert ((folded_normal_mean(loc, scale) - mc_mean).abs() < 4 * mc_se).all()


def test_folded_normal_mean_limits(float64):
    # tau -> 0: |nu|; nu = 0: tau sqrt(2/pi); both exactly representable limits.
    loc = torch.tensor([-3.0, 0.5, 2.0, 1e-3])
    tiny = torch.full_like(loc, 1e-300)
    assert torch.allclose(folded_normal_mean(loc, tiny), loc.abs(), rtol=0, atol=0)
    assert torch.equal(folded_normal_mean(loc, torch.zeros_like(loc)), loc.abs())
    scale = torch.tensor([0.1, 1.0, 7.0, 1e-8])
    assert torch.allclose(folded_normal_mean(torch.zeros_like(scale), scale), scale * math.sqrt(2 / math.pi),
                          rtol=1e-15)
    # Large |nu|/tau (up to 1e4): exactly |nu|, no overflow.
    loc = torch.tensor([1e4, -1e4, 5.0])
    scale = torch.tensor([1.0, 1.0, 5e-4])
    assert torch.equal(folded_normal_mean(loc, scale), loc.abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_folded_normal_mean_gradients_finite_everywhere(dtype):
    loc = torch.tensor([0.0, 0.0, 1e-30, -2.0, 1e4, -1e4, 3.0], dtype=dtype, requires_grad=True)
    scale = torch.tensor([1.0, 1e-30, 1e-30, 1e-20, 1.0, 1.0, 0.0], dtype=dtype, requires_grad=True)
    folded_normal_mean(loc, scale).sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()
    # d/dnu = erf(nu / (sqrt 2 tau)): 0 at nu = 0, sign(nu) far from it.
    assert loc.grad[0] == 0 and loc.grad[3] == -1 and loc.grad[4] == 1 and loc.grad[5] == -1
    # d/dtau = sqrt(2/pi) exp(-nu^2 / (2 tau^2)): sqrt(2/pi) at nu = 0, 0 far from it.
    assert torch.isclose(scale.grad[0], torch.tensor(math.sqrt(2 / math.pi), dtype=dtype))
    assert scale.grad[4] == 0 and scale.grad[6] == 0


def test_folded_normal_mean_gradient_matches_finite_differences(float64):
    loc = torch.tensor([-1.3, -0.2, 0.0, 0.4, 2.2], requires_grad=True)
    scale = torch.tensor([0.7, 0.1, 1.3, 2.0, 0.4], requires_grad=True)
    assert torch.autograd.gradcheck(folded_normal_mean, (loc, scale))


def test_folded_normal_mean_broadcasts(float64):
    loc = torch.randn(5, 3)
    scale = torch.tensor(0.7, requires_grad=True)
    full_scale = torch.full_like(loc, 0.7, requires_grad=True)
    folded_normal_mean(loc, scale).sum().backward()
    folded_normal_mean(loc, full_scale).sum().backward()
    assert scale.grad.shape == ()
    assert torch.isclose(scale.grad, full_scale.grad.sum())


def test_entropies_match_torch_distributions(float64):
    torch.manual_seed(0)
    scale = torch.rand(4, 5) + 0.1
    assert torch.allclose(entropy_from_scale(scale), dist.Normal(torch.zeros(4, 5), scale).to_event(1).entropy())
    factor = torch.randn(4, 5, 5)
    tril = torch.linalg.cholesky(factor @ factor.transpose(-1, -2) + torch.eye(5))
    assert torch.allclose(entropy_from_scale_tril(tril), dist.MultivariateNormal(torch.zeros(5), scale_tril=tril).entropy())
    # Column signs of L do not change T = L L^T, nor the entropy.
    flipped = tril * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    assert torch.allclose(entropy_from_scale_tril(flipped), entropy_from_scale_tril(tril))
    cov_factor, cov_diag = torch.randn(4, 5, 2), torch.rand(4, 5) + 0.2
    low_rank = dist.LowRankMultivariateNormal(torch.zeros(5), cov_factor, cov_diag)
    assert torch.allclose(entropy_from_low_rank(cov_factor, cov_diag), low_rank.entropy())
    covariance = cov_factor @ cov_factor.transpose(-1, -2) + torch.diag_embed(cov_diag)
    assert torch.allclose(low_rank_log_det(cov_factor, cov_diag), torch.linalg.slogdet(covariance).logabsdet)
    prior_scale = torch.rand(5) + 0.1
    assert torch.isclose(laplace_entropy(prior_scale), dist.Laplace(torch.zeros(5), prior_scale).entropy().sum())
    variance = torch.tensor(0.37)
    assert torch.isclose(isotropic_normal_entropy(variance, 7),
                         dist.Normal(torch.zeros(7), variance.sqrt()).entropy().sum())


def test_expected_squared_error_matches_monte_carlo(float64):
    torch.manual_seed(1)
    num, dim, n_latents = 3, 6, 4
    x, dictionary, mean = torch.randn(num, dim), torch.randn(dim, n_latents), torch.randn(num, n_latents)
    factor = torch.randn(num, n_latents, n_latents) * 0.5
    tril = torch.linalg.cholesky(factor @ factor.transpose(-1, -2) + 0.1 * torch.eye(n_latents))
    trace_term = ((dictionary @ tril).square()).sum()
    exact = expected_squared_error(x, dictionary, mean, trace_term)
    z = dist.MultivariateNormal(mean, scale_tril=tril).sample((200_000,))
    errors = (x - z @ dictionary.T).square().sum((-1, -2))
    assert abs(float(exact - errors.mean())) < 4 * float(errors.std() / math.sqrt(errors.numel()))


def test_laplace_cross_entropy_matches_numerical_integration(float64):
    # E_q[-log Laplace(z; m, lambda)] per latent by the trapezoid rule over +-12 standard deviations,
    # with torch's own densities, then summed over latents.
    loc = torch.tensor([[-2.0, -0.3, 0.0], [0.1, 1.5, 4.0]])
    scale = torch.tensor([[0.5, 1.0, 2.0], [0.05, 3.0, 1.0]])
    prior_scale = torch.tensor([0.5, 1.0, 2.5])
    prior_loc = torch.tensor([0.0, 0.4, -1.0])
    grid = loc[..., None] + scale[..., None] * torch.linspace(-12, 12, 200_001)
    density = dist.Normal(loc[..., None], scale[..., None]).log_prob(grid).exp()
    neg_log_prior = -dist.Laplace(prior_loc[:, None], prior_scale[:, None]).log_prob(grid)
    expected = torch.trapezoid(density * neg_log_prior, grid).sum(-1)
    assert torch.allclose(laplace_cross_entropy(loc, scale, prior_scale, prior_loc), expected, rtol=1e-7)
    # Elementwise values through a trailing dimension of size 1.
    elementwise = torch.trapezoid(density * neg_log_prior, grid)
    value = laplace_cross_entropy(loc[..., None], scale[..., None], prior_scale[:, None], prior_loc[:, None])
    assert torch.allclose(value, elementwise, rtol=1e-7)


def test_laplace_cross_entropy_matches_monte_carlo(float64):
    # The default prior location is 0; a (B, H) batch against a shared (H,) prior.
    loc = torch.tensor([[-1.0, 0.0, 0.7, 3.0], [0.2, -0.5, 0.0, 1.0]])
    scale = torch.tensor([[0.3, 1.0, 0.5, 2.0], [1.5, 0.2, 0.01, 0.4]])
    prior_scale = torch.tensor([0.4, 1.0, 0.8, 2.0])
    samples = -dist.Laplace(torch.zeros(4), prior_scale).log_prob(dist.Normal(loc, scale).sample((400_000,))).sum(-1)
    standard_error = samples.std(0) / math.sqrt(samples.size(0))
    assert ((laplace_cross_entropy(loc, scale, prior_scale) - samples.mean(0)).abs() < 4 * standard_error).all()


def test_laplace_cross_entropy_from_abs_mean_is_minus_log_density_at_a_point(float64):
    # A point mass at z has E|z_h| = |z_h|: the cross-entropy is -log p(z) (torch's Laplace).
    z = torch.tensor([[-1.3, 0.0, 2.2], [0.4, -0.1, 7.0]])
    prior_scale = torch.tensor([0.3, 1.0, 2.0])
    expected = -dist.Laplace(torch.zeros(3), prior_scale).log_prob(z).sum(-1)
    assert torch.allclose(laplace_cross_entropy_from_abs_mean(z.abs(), prior_scale), expected)
    assert torch.allclose(laplace_cross_entropy(z, torch.zeros_like(z), prior_scale), expected)


def test_normal_log_normalizer_matches_torch_log_densities(float64):
    # log Normal(x; mu, sigma^2 I_D) + ||x - mu||^2 / (2 sigma^2), from torch's own densities.
    variance = torch.tensor([0.09, 1.0, 4.5])
    dim = 7
    mu, x = torch.randn(dim), torch.randn(3, dim)
    mvn = dist.MultivariateNormal(mu, covariance_matrix=variance[:, None, None] * torch.eye(dim))
    expected = mvn.log_prob(x) + (x - mu).square().sum(-1) / (2 * variance)
    assert torch.allclose(normal_log_normalizer(variance, dim), expected)
    # At the mean the density is the normaliser itself; Python numbers work too.
    assert math.isclose(float(normal_log_normalizer(0.25, dim)),
                        float(dist.Normal(torch.zeros(dim), 0.5).log_prob(torch.zeros(dim)).sum()), rel_tol=1e-12)
