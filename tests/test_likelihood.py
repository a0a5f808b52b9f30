"""log_likelihood against log p(x) by numerical integration, and GaussianPosterior.per_point_distribution."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from helpers import exact_posterior, fixed_gaussian_guide, per_point_elbo
from pyro_esc import AnalyticELBO, GaussianPosterior, SparseCoding, log_likelihood
from pyro_esc.likelihood import LogLikelihood

DICTIONARY = [[1.0, 0.6], [0.3, 0.8], [0.5, -0.2]]  # overlapping columns (cos 0.63)
PRIOR_SCALE = [1.0, 0.7]
NOISE_VAR = 0.2


def tiny_model(num=4, n_latents=2):
    """D = 3, H = 1 or 2, fixed parameters; x drawn from the model."""
    model = SparseCoding(3, n_latents, init="random")
    model.set_dictionary(torch.tensor(DICTIONARY)[:, :n_latents])
    model.set_scales(prior_scale=torch.tensor(PRIOR_SCALE[:n_latents]), noise_var=NOISE_VAR)
    _, x = model.sample(num)
    return model, x


def exact_values(model, x):
    results = [exact_posterior(point, model.dictionary.detach(), model.prior_scale.detach(),
                               model.noise_var.detach()) for point in x]
    return torch.tensor([result[0] for result in results])


def gaussian_proposals(model, x):
    """Per-point (mean, covariance) of the Gaussian that the posterior is inside the orthant of the
    least-squares solution: a fair proposal, but not the posterior (nor any guide's optimum)."""
    with torch.no_grad():
        w, lam, var = model.dictionary, model.prior_scale, model.noise_var
        covariance = var * torch.linalg.inv(w.T @ w)
        least_squares = x @ torch.linalg.pinv(w).T
        mean = (w.T @ x.T / var).T - least_squares.sign() / lam
        return mean @ covariance.T, covariance.expand(x.size(0), -1, -1).clone()


def guides(model, x):
    mean, covariance = gaussian_proposals(model, x)
    # Widened by 1.5: tails heavier than the posterior's keep the weights bounded, which is
    # when the delta-method standard error can be trusted.
    full = fixed_gaussian_guide(mean, scale_tril=torch.linalg.cholesky(1.5 * covariance))
    diagonal = fixed_gaussian_guide(mean, scale=(1.5 * covariance.diagonal(dim1=-2, dim2=-1)).sqrt())
    # Mean-field widths 1 / sqrt(precision_hh), narrower than the marginals (as mean-field VI
    # finds): a poor proposal whose weights are heavy-tailed.
    precision_diag = torch.linalg.inv(covariance).diagonal(dim1=-2, dim2=-1)
    narrow = fixed_gaussian_guide(mean, scale=precision_diag.rsqrt())
    return {"full": full, "diagonal": diagonal, "narrow": narrow}


# ------------------------------------------------------------------ the independent route


def test_numerical_integration_agrees_with_scipy(float64):
    # The Gauss-Legendre orthant rule of helpers.exact_posterior against scipy's adaptive quadrature.
    model, x = tiny_model(num=1)
    w, lam, var = (t.detach().numpy() for t in (model.dictionary, model.prior_scale, model.noise_var))
    point = x[0].numpy()

    def density(*z):
        z = np.array(z[::-1])  # dblquad passes (inner, outer)
        return math.exp(-(np.abs(z) / lam).sum() - np.log(2 * lam).sum()
                        - 0.5 * (3 * math.log(2 * math.pi * var) + ((point - w @ z) ** 2).sum() / var))

    total = 0.0
    for a, b in ((-25, 0), (0, 25)):  # split at the Laplace kinks
        for c, d in ((-25, 0), (0, 25)):
            total += scipy.integrate.dblquad(density, a, b, c, d, epsabs=1e-13, epsrel=1e-11)[0]
    assert exact_posterior(point, w, lam, var)[0] == pytest.approx(math.log(total), abs=1e-8)

    def density_one(z):  # H = 1, with the first column only
        return math.exp(-abs(z) / lam[0] - math.log(2 * lam[0])
                        - 0.5 * (3 * math.log(2 * math.pi * var) + ((point - w[:, 0] * z) ** 2).sum() / var))

    total_one = sum(scipy.integrate.quad(density_one, a, b, epsabs=0, epsrel=1e-12)[0] for a, b in ((-30, 0), (0, 30)))
    assert exact_posterior(point, w[:, :1], lam[:1], var)[0] == pytest.approx(math.log(total_one), abs=1e-9)


# ------------------------------------------------------------------ the estimate


@pytest.mark.parametrize("n_latents", [1, 2])
@pytest.mark.parametrize("kind", ["full", "diagonal"])
def test_estimate_matches_exact_log_likelihood(float64, n_latents, kind):
    model, x = tiny_model(n_latents=n_latents)
    guide = guides(model, x)[kind]
    exact = exact_values(model, x)
    result = log_likelihood(model, guide, x, num_samples=4000, seed=1, progress=False)
    assert isinstance(result, LogLikelihood)
    assert result.per_point.shape == result.standard_error.shape == (x.size(0),)
    assert bool((result.standard_error < 0.03).all())  # precise enough for the comparison to mean something
    assert bool(((result.per_point - exact).abs() < 4 * result.standard_error + 1e-3).all())
    assert float(result.total) == pytest.approx(float(result.per_point.sum()))
    assert float(abs(result.total - exact.sum())) < 4 * float(result.total_standard_error) + 4e-3


@pytest.mark.parametrize("kind", ["diagonal", "narrow"])
def test_estimate_is_above_the_elbo_and_below_log_likelihood(float64, kind):
    model, x = tiny_model(num=6)
    guide = guides(model, x)[kind]
    elbo = per_point_elbo(model, guide, x)
    # The per-point ELBO helper is the closed-form AnalyticELBO, point by point.
    assert float(elbo.sum()) == pytest.approx(-AnalyticELBO().loss(model, guide, x), rel=1e-12)
    exact = exact_values(model, x)
    assert bool((exact - elbo > 0.02).all())  # a visible gap, so the bound check can fail
    for num_samples in (2, 20, 2000):
        result = log_likelihood(model, guide, x, num_samples=num_samples, seed=2, progress=False)
        if num_samples == 2000:
            assert bool((result.per_point > elbo + 0.5 * (exact - elbo)).all())  # most of the gap closed
            assert bool((result.per_point < exact + 4 * result.standard_error).all())
        assert bool((result.per_point > elbo - 4 * result.standard_error).all())


def test_standard_error_matches_the_spread_of_repeated_estimates(float64):
    # 400 copies of one point give 400 independent estimates in one call.
    model, x = tiny_model(num=1)
    copies = x.expand(400, -1).clone()
    guide = guides(model, copies)["full"]
    result = log_likelihood(model, guide, copies, num_samples=50, seed=3, progress=False)
    spread = float(result.per_point.std())
    assert float(result.standard_error.mean()) == pytest.approx(spread, rel=0.2)
    exact = float(exact_values(model, x)[0])
    assert float(result.per_point.mean()) == pytest.approx(exact, abs=4 * spread / 20)
    assert bool(((result.effective_sample_size >= 1) & (result.effective_sample_size <= 50)).all())
    # A good proposal: most of the 50 draws count.
    assert float(result.effective_sample_size.mean()) > 25


def test_blocks_subsample_and_seed(float64):
    model, x = tiny_model(num=7)
    guide = guides(model, x)["full"]
    state = torch.get_rng_state()
    first = log_likelihood(model, guide, x, num_samples=1000, batch_size=3, sample_batch_size=300, seed=4,
                           progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # a seed leaves the global RNG alone
    again = log_likelihood(model, guide, x, num_samples=1000, batch_size=3, sample_batch_size=300, seed=4,
                           progress=False)
    assert torch.equal(first.per_point, again.per_point)
    whole = log_likelihood(model, guide, x, num_samples=1000, seed=5, progress=False)
    tolerance = 4 * (first.standard_error.square() + whole.standard_error.square()).sqrt()
    assert bool(((first.per_point - whole.per_point).abs() < tolerance).all())
    index = torch.tensor([5, 1])
    part = log_likelihood(model, guide, x, num_samples=1000, subsample=index, seed=6, progress=False)
    assert part.per_point.shape == (2,)
    assert bool(((part.per_point - whole.per_point[index]).abs() < 4 * whole.standard_error[index] * 1.5).all())


def test_autonormal_and_float32():
    model, x = tiny_model()
    guide = AutoNormal(model)
    result = log_likelihood(model, guide, x, num_samples=200, progress=False)
    assert result.per_point.dtype == torch.float32
    assert bool(torch.isfinite(result.per_point).all())
    # AutoNormal starts near the prior's mode: a poor proposal, but still below log p(x) on average.
    exact = exact_values(model, x).float()
    assert float((result.per_point - exact).mean()) < 0.1


def test_rejects_bad_arguments(float64):
    model, x = tiny_model()
    guide = guides(model, x)["full"]
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(model, guide, x, num_samples=1)
    with pytest.raises(ValueError, match="batch_size"):
        log_likelihood(model, guide, x, batch_size=0)
    with pytest.raises(ValueError, match="x"):
        log_likelihood(model, guide, x[:, :2])
    with pytest.raises(ValueError, match="subsample"):
        log_likelihood(model, guide, x, subsample=torch.tensor([9]))
    with pytest.raises(ValueError, match="SparseCoding"):
        log_likelihood(lambda x: None, guide, x)
    joint = AutoMultivariateNormal(model)
    with pytest.raises(ValueError, match="per-point"):
        log_likelihood(model, joint, x, num_samples=10, progress=False)


# ------------------------------------------------------------------ per_point_distribution


def test_per_point_distribution_log_prob_and_entropy(float64):
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, generator=generator)
    tril = torch.randn(3, 4, 4, generator=generator).tril() + 2 * torch.eye(4)
    factor, diag = torch.randn(3, 4, 2, generator=generator), torch.rand(3, 4, generator=generator) + 0.1
    scale = torch.rand(3, 4, generator=generator) + 0.1
    cases = {
        "diagonal": (GaussianPosterior.from_scale(mean, scale), torch.diag_embed(scale.square())),
        "full": (GaussianPosterior.from_scale_tril(mean, tril), tril @ tril.transpose(-1, -2)),
        "low-rank": (GaussianPosterior.from_low_rank(mean, factor, diag),
                     factor @ factor.transpose(-1, -2) + torch.diag_embed(diag)),
    }
    z = torch.randn(5, 3, 4, generator=generator)
    for name, (posterior, covariance) in cases.items():
        distribution = posterior.per_point_distribution()
        assert distribution.batch_shape == (3,) and distribution.event_shape == (4,), name
        expected = np.stack([[scipy.stats.multivariate_normal(mean[n].numpy(), covariance[n].numpy()).logpdf(z[k, n])
                              for n in range(3)] for k in range(5)])
        assert np.allclose(distribution.log_prob(z).numpy(), expected), name
        assert float(distribution.entropy().sum()) == pytest.approx(float(posterior.entropy)), name
        sample = distribution.sample((20000,))
        assert torch.allclose(sample.mean(0), mean, atol=0.1), name


def test_per_point_distribution_rejects_joint_posteriors(float64):
    posterior = GaussianPosterior.from_joint(torch.zeros(2, 3), torch.ones(2, 3), torch.eye(3) * 2, torch.tensor(1.0))
    with pytest.raises(ValueError, match="joint"):
        posterior.per_point_distribution()
