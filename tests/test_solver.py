"""solve_posteriors: every point's posterior at its optimum, checked against independent routes.

- a one-point-at-a-time fit (torch's L-BFGS, the ELBO from torch's own distributions) reaches the
  same ELBO per point;
- the joint L-BFGS fit that encode used before (fit with the model fixed, float64) is never better;
- at the solution the gradient of the per-point ELBO (autograd through pyro_esc.refinement.point_elbos,
  a second formula) vanishes;
- a point's result does not depend on the other points of its batch;
- annealing weights give the optimum of the weighted objective.
"""

import pytest
import torch

from pyro.infer.autoguide import AutoNormal

from helpers import one_point_optimum, per_point_elbo
from pyro_esc import AnalyticELBO, GaussianPosterior, LocalMultivariateNormal, SparseCoding, fit, solve_posteriors
from pyro_esc.data import bars
from pyro_esc.gaussian import expected_squared_errors, folded_normal_mean, laplace_cross_entropy_from_abs_mean
from pyro_esc.posterior import gaussian_posterior
from pyro_esc.refinement import point_elbos


def model_of(side=3, n=200, seed=0, noise=0.3):
    x, true = bars(n, side=side, noise=noise, seed=seed)
    model = SparseCoding(x.size(1), 2 * side).double()
    model.set_dictionary(true.double() + 0.05 * torch.randn(true.shape, dtype=torch.float64))
    model.set_scales(torch.full((2 * side,), 0.4), torch.tensor(noise ** 2 * 1.3))
    return model, x.double()


def fixed(model):
    return model.dictionary.detach(), model.prior_scale.detach(), model.noise_var.detach()


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_each_point_reaches_the_optimum_found_one_point_at_a_time(covariance):
    model, x = model_of()
    solved = solve_posteriors(model, x[:8], covariance)
    assert bool(solved.converged.all())
    for n in range(8):
        _, reference = one_point_optimum(model, x[n], full=covariance == "full")
        assert float(solved.elbo[n]) >= reference - 1e-7, n
        assert float(solved.elbo[n]) == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("covariance, make_guide", [
    ("diag", lambda model: AutoNormal(model, create_plates=model.create_plates)),
    ("full", LocalMultivariateNormal),
])
def test_the_joint_lbfgs_fit_at_the_fixed_model_is_never_better(covariance, make_guide):
    model, x = model_of(n=150)
    solved = solve_posteriors(model, x, covariance)
    guide = make_guide(model)
    fit(model, guide, x, loss=AnalyticELBO(), optimizer="lbfgs", train_model=False, tol=1e-10, progress=False)
    with torch.no_grad():
        joint = point_elbos(gaussian_posterior(guide, x), x, *fixed(model))
    assert bool((solved.elbo >= joint - 1e-8).all())
    assert float((solved.elbo - joint).mean()) < 1e-5


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_the_gradient_vanishes_at_the_solution(covariance):
    model, x = model_of(n=40)
    solved = solve_posteriors(model, x, covariance, tol=1e-12)
    posterior = solved.posterior
    mean = posterior.mean.clone().requires_grad_()
    if covariance == "diag":
        scale = posterior.stddev.clone().requires_grad_()
        elbo = point_elbos(GaussianPosterior.from_scale(mean, scale), x, *fixed(model)).sum()
        grads = torch.autograd.grad(elbo, [mean, scale])
    else:
        tril = posterior.scale_tril.clone().requires_grad_()
        elbo = point_elbos(GaussianPosterior.from_scale_tril(mean, tril), x, *fixed(model)).sum()
        grads = torch.autograd.grad(elbo, [mean, tril])
        grads = (grads[0], grads[1].tril())
    for grad in grads:
        assert float(grad.abs().max()) < 1e-5
    # The reported ELBO is each point's closed-form ELBO (a second formula, with torch's entropy).
    assert torch.allclose(solved.elbo, per_point_elbo(model, posterior, x), atol=1e-10)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_a_points_result_does_not_depend_on_its_batch(covariance):
    model, x = model_of(n=60)
    together = solve_posteriors(model, x, covariance)
    for n in (0, 17, 59):
        alone = solve_posteriors(model, x[n:n + 1], covariance)
        assert torch.allclose(alone.posterior.mean[0], together.posterior.mean[n], atol=1e-10, rtol=0)
        assert torch.allclose(alone.posterior.covariance_matrices()[0],
                              together.posterior.covariance_matrices()[n], atol=1e-10, rtol=0)
        assert int(alone.iterations[0]) == int(together.iterations[n])
    permutation = torch.randperm(60)
    shuffled = solve_posteriors(model, x[permutation], covariance)
    assert torch.allclose(shuffled.posterior.mean, together.posterior.mean[permutation], atol=1e-10, rtol=0)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_a_warm_start_reaches_the_same_optimum(covariance):
    model, x = model_of(n=50)
    cold = solve_posteriors(model, x, covariance)
    start = GaussianPosterior.from_scale(cold.posterior.mean + 0.3 * torch.randn_like(cold.posterior.mean),
                                         cold.posterior.stddev * 2)
    warm = solve_posteriors(model, x, covariance, init=start)
    assert torch.allclose(warm.elbo, cold.elbo, atol=1e-8)
    near = solve_posteriors(model, x, covariance, init=cold.posterior)
    assert int(near.iterations.max()) <= 2


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_annealing_weights_solve_the_weighted_objective(covariance):
    model, x = model_of(n=30)
    betas = (1.5, 4.0, 0.8)
    solved = solve_posteriors(model, x, covariance, betas=betas, tol=1e-12)
    dictionary, prior_scale, noise_var = fixed(model)
    beta_q, beta_p, beta_x = betas
    # The weighted objective beta_q H[q] - beta_p E[-log p(z)] - beta_x E[-log p(x|z)] (standard-ELBO terms).
    posterior = solved.posterior
    mean = posterior.mean.clone().requires_grad_()
    if covariance == "diag":
        other = posterior.stddev.clone().requires_grad_()
        q = GaussianPosterior.from_scale(mean, other)
    else:
        other = posterior.scale_tril.clone().requires_grad_()
        q = GaussianPosterior.from_scale_tril(mean, other)
    entropy = q.point_entropies().sum()
    prior_term = -laplace_cross_entropy_from_abs_mean(folded_normal_mean(q.mean, q.stddev), prior_scale).sum()
    errors = expected_squared_errors(x, dictionary, q.mean, q.trace_terms(dictionary))
    likelihood_term = (-0.5 * x.size(1) * torch.log(2 * torch.pi * noise_var) - errors / (2 * noise_var)).sum()
    weighted = beta_q * entropy + beta_p * prior_term + beta_x * likelihood_term
    grads = torch.autograd.grad(weighted, [mean, other])
    assert float(grads[0].abs().max()) < 1e-5
    assert float((grads[1].tril() if covariance == "full" else grads[1]).abs().max()) < 1e-5
    # And the reported ELBO is the unweighted one of that posterior (a second formula, with torch's entropy).
    assert torch.allclose(solved.elbo, per_point_elbo(model, posterior, x), atol=1e-10)


def test_the_result_follows_the_data_dtype_and_reports_unconverged_points():
    model, x = model_of(n=20)
    solved = solve_posteriors(model, x.float(), "full")
    assert solved.posterior.mean.dtype == torch.float32 and solved.elbo.dtype == torch.float32
    capped = solve_posteriors(model, x, "diag", max_iter=1)
    assert not bool(capped.converged.all()) and int(capped.iterations.max()) == 1


def test_one_point_or_identical_points():
    model, x = model_of(n=5)
    twice = solve_posteriors(model, torch.cat([x[:1], x[:1]]), "full")
    assert torch.equal(twice.posterior.mean[0], twice.posterior.mean[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(covariance="lowrank"), "covariance must be one of"),
    (dict(tol=0.0), "tol must be a number > 0"),
    (dict(max_iter=0), "max_iter"),
    (dict(betas=(1.0, 0.0, 1.0)), "betas must be three numbers > 0"),
    (dict(init=GaussianPosterior.from_scale(torch.zeros(3, 6), torch.ones(3, 6))), "init must be a per-point"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    model, x = model_of(n=10)
    with pytest.raises(ValueError, match=message):
        solve_posteriors(model, x, **kwargs)


def test_bad_model_or_data_are_clear_errors():
    model, x = model_of(n=10)
    with pytest.raises(ValueError, match="SparseCoding"):
        solve_posteriors(object(), x)
    with pytest.raises(ValueError, match="columns"):
        solve_posteriors(model, x[:, :4])
