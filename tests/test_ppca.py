"""Probabilistic PCA, exact end to end: SparseCoding(prior="gaussian") against Tipping & Bishop's
closed-form maximum-likelihood solution (pyro_esc.evaluate.ppca), an independent reference for the whole
machine (objective, L-BFGS route, float64 finish, EM route, log-likelihood, standard units)."""

import pytest
import torch

import pyro

from pyro_esc import LocalMultivariateNormal, SparseCoding, fit, log_likelihood
from pyro_esc.evaluate.ppca import ppca_log_likelihood, ppca_maximum_likelihood


def ppca_data(n=2000, dim=8, latents=3, seed=0, unit=1.0):
    torch.manual_seed(seed)
    truth = SparseCoding(dim, latents, prior="gaussian").double()
    truth.set_dictionary(torch.randn(dim, latents, dtype=torch.float64))
    truth.set_scales(torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64))
    _, x = truth.sample(n)
    return unit * x


def fit_ppca(x, latents=3, **options):
    pyro.clear_param_store()
    model = SparseCoding(x.size(1), latents, prior="gaussian")
    guide = LocalMultivariateNormal(model)
    history = fit(model, guide, x, progress=False, seed=0, **options)
    return model, guide, history


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_reaches_the_closed_form_maximum_likelihood(seed):
    x = ppca_data(seed=seed)
    solution = ppca_maximum_likelihood(x, 3)
    model, guide, history = fit_ppca(x)
    assert history.converged
    # The ELBO at the optimum is the log-likelihood itself (the posteriors are exact).
    assert abs(history.final_elbo - float(solution.log_likelihood)) < 1e-5
    # sigma^2 is the mean of the discarded eigenvalues of the second-moment matrix.
    assert abs(float(model.noise_var.detach()) - float(solution.noise_var)) < 1e-5 * float(solution.noise_var)
    # The learned subspace is the leading eigenvectors' (W diag(s) = U_H (L_H - sigma^2)^(1/2) R).
    loading = (model.dictionary * model.prior_scale).detach()
    expected = solution.dictionary * solution.prior_scale
    assert torch.allclose(loading @ loading.T, expected @ expected.T, atol=1e-4)
    # And the fitted model's exact log-likelihood equals its ELBO.
    assert abs(float(ppca_log_likelihood(model, x).mean()) - history.final_elbo) < 1e-6


def test_data_in_other_units_reach_the_same_solution_shifted_by_d_log_c():
    x = ppca_data()
    _, _, base = fit_ppca(x)
    _, _, scaled = fit_ppca(255.0 * x)
    assert abs(scaled.final_elbo - (base.final_elbo - 8 * torch.log(torch.tensor(255.0)).item())) < 1e-5


@pytest.mark.filterwarnings("ignore::pyro_esc.convergence.ConvergenceWarning")  # tol 1e-10 is not met: fine
def test_em_route_reaches_the_same_optimum():
    x = ppca_data(n=1000)
    solution = ppca_maximum_likelihood(x, 3)
    _, _, history = fit_ppca(x, optimizer="em", batch_size=250, epochs=200, tol=1e-10)
    assert abs(history.final_elbo - float(solution.log_likelihood)) < 1e-4


def test_importance_sampled_log_likelihood_is_exact_with_the_exact_posterior():
    # With q = p(z|x) every importance weight equals p(x): the estimate is exact up to rounding.
    x = ppca_data(n=300)
    model, guide, _ = fit_ppca(x)
    estimate = log_likelihood(model, guide, x, num_samples=16, seed=0)
    assert torch.allclose(estimate.per_point, ppca_log_likelihood(model, x).to(estimate.per_point), atol=1e-5)


def test_closed_form_refuses_degenerate_settings():
    x = ppca_data(n=200)
    with pytest.raises(ValueError, match="below the data's dimension"):
        ppca_maximum_likelihood(x, 8)
    with pytest.raises(ValueError, match="does not exceed"):
        ppca_maximum_likelihood(torch.eye(4, dtype=torch.float64), 2)  # isotropic: no leading subspace
    with pytest.raises(ValueError, match="prior='gaussian'"):
        ppca_log_likelihood(SparseCoding(8, 3), x)
