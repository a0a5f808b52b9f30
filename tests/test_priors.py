"""The prior seam (pyro_esc.priors): each prior against independent references, and the whole
machine with a non-Laplace prior.

References: torch's own distributions (log densities, entropies), Monte Carlo (expected statistics),
finite differences (the solver's derivatives, the optimal scale), Pyro's Trace_ELBO (the
objectives), the closed-form Gaussian posterior (the solver with a Gaussian prior). The third
prior is the user guide's "Adding a prior" block (docs/guide/extending.md), executed as written.
"""

import math

import pytest
import torch

import pyro
from pyro.infer.autoguide import AutoNormal

from helpers import assert_analytic_elbo_matches_trace_elbo, guide_problem, readme_prior_module
from pyro_esc import AnalyticELBO, EntropyELBO, LocalMultivariateNormal, SparseCoding, encode, fit, load, save
from pyro_esc.data import bars
from pyro_esc.priors import Gaussian, Laplace, Prior, get_prior, registered_priors
from pyro_esc.solver import solve_posteriors


def readme_prior(power=1.5):
    return readme_prior_module()["GeneralizedNormal"](power)


PRIORS = {"laplace": Laplace, "gaussian": Gaussian, "readme": readme_prior}


@pytest.fixture(params=sorted(PRIORS))
def prior(request):
    return PRIORS[request.param]()


def test_minus_log_density_is_log_normalizer_plus_penalty_times_statistic(float64, prior):
    scale = torch.tensor([0.3, 1.0, 2.5])
    z = torch.linspace(-4, 4, 17).unsqueeze(-1)
    own = -(prior.log_normalizer(scale) + prior.penalty(scale) * prior.statistic(z))
    assert torch.allclose(own, prior.distribution(scale).log_prob(z))


def test_entropy_matches_the_distribution_and_monte_carlo(float64, prior):
    scale = torch.tensor([0.3, 1.0, 2.5])
    distribution = prior.distribution(scale)
    torch.manual_seed(0)
    draws = -distribution.log_prob(distribution.sample((200_000,)))
    monte_carlo, error = draws.mean(0), draws.std(0) / math.sqrt(draws.size(0))
    assert ((monte_carlo - prior.entropy(scale.unsqueeze(-1))).abs() < 5 * error).all()
    try:
        assert torch.allclose(prior.entropy(scale), distribution.entropy().sum())
    except NotImplementedError:  # the README's distribution does not define entropy()
        pass


def test_cross_entropy_at_the_optimal_scale_is_the_entropy_and_the_scale_is_a_minimum(float64, prior):
    mean_statistic = torch.tensor([0.05, 0.7, 3.0])
    best = prior.optimal_scale(mean_statistic)
    assert torch.allclose(prior.cross_entropy(mean_statistic.unsqueeze(-1), best.unsqueeze(-1)),
                          prior.entropy(best.unsqueeze(-1)))
    for factor in (0.99, 1.01):
        moved = prior.cross_entropy(mean_statistic.unsqueeze(-1), (factor * best).unsqueeze(-1))
        assert (moved > prior.cross_entropy(mean_statistic.unsqueeze(-1), best.unsqueeze(-1))).all()


def test_expected_statistic_matches_monte_carlo(float64, prior):
    mean = torch.tensor([0.0, 0.4, -1.3, 2.0])
    scale = torch.tensor([0.5, 0.1, 0.8, 1.5])
    torch.manual_seed(1)
    draws = prior.statistic(mean + scale * torch.randn(400_000, 4))
    error = draws.std(0) / math.sqrt(draws.size(0))
    assert ((draws.mean(0) - prior.expected_statistic(mean, scale)).abs() < 5 * error).all()


def test_statistic_derivatives_match_finite_differences(float64, prior):
    mean = torch.tensor([0.0, 0.4, -1.3, 2.0])
    scale = torch.tensor([0.5, 0.3, 0.8, 1.5])
    value, d_mean, d_scale, d2_mean, d2_mean_scale, d2_scale = prior.statistic_derivatives(mean, scale)
    step = 1e-5
    f = prior.expected_statistic
    assert torch.allclose(value, f(mean, scale))
    assert torch.allclose(d_mean, (f(mean + step, scale) - f(mean - step, scale)) / (2 * step), atol=1e-6)
    assert torch.allclose(d_scale, (f(mean, scale + step) - f(mean, scale - step)) / (2 * step), atol=1e-6)
    step = 1e-4
    assert torch.allclose(d2_mean, (f(mean + step, scale) - 2 * f(mean, scale) + f(mean - step, scale)) / step ** 2,
                          atol=1e-4)
    assert torch.allclose(d2_scale, (f(mean, scale + step) - 2 * f(mean, scale) + f(mean, scale - step)) / step ** 2,
                          atol=1e-4)
    mixed = (f(mean + step, scale + step) - f(mean + step, scale - step) - f(mean - step, scale + step)
             + f(mean - step, scale - step)) / (4 * step ** 2)
    assert torch.allclose(d2_mean_scale, mixed, atol=1e-4)


def test_priors_are_named_built_from_their_names_and_compared_by_settings():
    assert {"laplace", "gaussian"} <= set(registered_priors())
    assert get_prior("laplace") == Laplace() and get_prior("gaussian") == Gaussian()
    assert get_prior(readme_prior(1.5).name, power=1.5) == readme_prior(1.5) != readme_prior(1.2)
    with pytest.raises(ValueError, match="'cauchy'.*Adding a prior"):
        get_prior("cauchy")
    with pytest.raises(ValueError, match="does not take the settings"):
        get_prior("laplace", power=2)
    with pytest.raises(ValueError, match="prior must be"):
        SparseCoding(4, 2, prior=3)


# ------------------------------------------------------------ the objectives through the seam


@pytest.mark.parametrize("guide_name", ["AutoNormal", "LocalMultivariateNormal", "AmortizedNormal-full"])
@pytest.mark.parametrize("prior_name", ["gaussian", "readme"])
def test_objectives_with_other_priors_agree_with_trace_elbo(float64, guide_name, prior_name):
    model, guide, x = guide_problem(guide_name, prior=PRIORS[prior_name]())
    entropy_loss = EntropyELBO().loss(model, guide, x)
    EntropyELBO().update(model, guide, x)
    assert abs(AnalyticELBO().loss(model, guide, x) - entropy_loss) < 1e-8 * abs(entropy_loss)
    assert_analytic_elbo_matches_trace_elbo(model, guide, x, "optimal")


@pytest.mark.parametrize("prior_name", ["gaussian", "readme"])
def test_the_model_samples_and_initialises_through_its_prior(float64, prior_name):
    model = SparseCoding(5, 3, prior=PRIORS[prior_name]())
    model.set_dictionary(torch.eye(5)[:, :3])
    model.set_scales(torch.tensor([0.5, 1.0, 2.0]), 0.01)
    torch.manual_seed(0)
    z, _ = model.sample(100_000)
    assert torch.allclose(z.var(0), model.prior.distribution(model.prior_scale.detach()).variance, rtol=0.03)
    fresh = SparseCoding(5, 3, prior=PRIORS[prior_name]())
    x = torch.randn(400, 5)
    fresh(x)  # initialises from x: the latents' variance is mean ||x||^2 / H
    variance = fresh.prior.distribution(fresh.prior_scale.detach()).variance
    assert torch.allclose(variance, x.square().sum(1).mean() / 3 * torch.ones(3))


# ------------------------------------------------------------ the solver with a Gaussian prior


def gaussian_model(seed=0, dim=6, latents=3):
    torch.manual_seed(seed)
    model = SparseCoding(dim, latents, prior="gaussian")
    model.set_dictionary(torch.randn(dim, latents))
    model.set_scales(torch.tensor([2.0, 1.0, 0.5])[:latents], 0.3)
    return model


def exact_gaussian_posterior(model, x):
    """The true posterior of a Gaussian-prior model: precision W^T W / sigma^2 + diag(1 / s^2)."""
    w, s, noise = model.dictionary.detach(), model.prior_scale.detach(), model.noise_var.detach()
    precision = w.T @ w / noise + torch.diag(s.square().reciprocal())
    covariance = torch.linalg.inv(precision)
    return (x @ w / noise) @ covariance, covariance, precision


def test_solver_reaches_the_exact_posterior_with_a_gaussian_prior(float64):
    model = gaussian_model()
    _, x = model.sample(20)
    mean, covariance, precision = exact_gaussian_posterior(model, x)
    full = solve_posteriors(model, x, "full")
    assert full.converged.all()
    assert torch.allclose(full.posterior.mean, mean, atol=1e-8)
    assert torch.allclose(full.posterior.covariance_matrices(), covariance.expand(20, 3, 3), atol=1e-8)
    # The best diagonal Gaussian of a Gaussian: the exact mean, variances 1 / diag(precision).
    diag = solve_posteriors(model, x, "diag")
    assert torch.allclose(diag.posterior.mean, mean, atol=1e-7)
    assert torch.allclose(diag.posterior.variance, precision.diagonal().reciprocal().expand(20, 3), atol=1e-8)
    # encode asks the same solver through the model's prior.
    guide = LocalMultivariateNormal(model)
    assert torch.allclose(encode(model, guide, x).mean, mean, atol=1e-8)


@pytest.mark.filterwarnings("ignore::pyro_esc.convergence.ConvergenceWarning")  # any trained model will do
def test_solver_with_the_readme_prior_finds_each_points_optimum(float64):
    # The per-point ELBO's gradient (autograd through point_elbos, an independent formula) vanishes.
    from pyro_esc.posterior import GaussianPosterior
    from pyro_esc.refinement import point_elbos

    x, _ = bars(10, side=3, seed=0)
    model = SparseCoding(9, 6, prior=readme_prior())
    fit(model, AutoNormal(model), x, steps=100, progress=False, seed=0)
    solved = solve_posteriors(model, x, "diag")
    assert solved.converged.all()
    mean = solved.posterior.mean.clone().requires_grad_(True)
    scale = solved.posterior.stddev.clone().requires_grad_(True)
    fixed = (model.dictionary.detach(), model.prior_scale.detach(), model.noise_var.detach(), model.prior)
    elbo = point_elbos(GaussianPosterior.from_scale(mean, scale), x, *fixed).sum()
    for grad in torch.autograd.grad(elbo, (mean, scale)):
        assert grad.abs().max() < 1e-5


# ------------------------------------------------------------ files and routes


@pytest.mark.filterwarnings("ignore::pyro_esc.convergence.ConvergenceWarning")  # a 5-step run
def test_save_and_load_keep_the_prior_and_checkpoints_refuse_another(float64, tmp_path):
    x, _ = bars(30, side=3, seed=0)
    model = SparseCoding(9, 6, prior=readme_prior(1.3))
    guide = AutoNormal(model)
    fit(model, guide, x, steps=5, progress=False, seed=0, checkpoint=str(tmp_path / "run.pt"), checkpoint_every=5)
    save(tmp_path / "model.pt", model, guide, per_point=True)
    pyro.clear_param_store()
    loaded = load(tmp_path / "model.pt")
    assert loaded.model.prior == readme_prior(1.3)
    assert torch.equal(loaded.model.prior_scale, model.prior_scale)
    from pyro_esc.priors import base

    pyro.clear_param_store()
    registered = base._REGISTRY.pop("generalized-normal")  # as in a process that never imported the prior
    try:
        with pytest.raises(ValueError, match="'generalized-normal'.*import the module that defines it"):
            load(tmp_path / "model.pt")
    finally:
        base._REGISTRY["generalized-normal"] = registered
    pyro.clear_param_store()
    other = SparseCoding(9, 6)  # Laplace
    with pytest.raises(ValueError, match="prior"):
        fit(other, AutoNormal(other), x, steps=10, progress=False, resume=str(tmp_path / "run.pt"))


@pytest.mark.parametrize("optimizer", ["em", "rowwise"])
def test_minibatch_routes_train_a_gaussian_prior_model(float64, optimizer):
    # Both routes reach the full-batch L-BFGS optimum's neighbourhood on a small PPCA problem.
    model = gaussian_model(seed=2)
    _, x = model.sample(400)
    pyro.clear_param_store()
    reference = SparseCoding(6, 3, prior="gaussian")
    best = fit(reference, LocalMultivariateNormal(reference), x, progress=False, seed=0).final_elbo
    pyro.clear_param_store()
    trained = SparseCoding(6, 3, prior="gaussian")
    guide = (LocalMultivariateNormal(trained) if optimizer == "em"
             else AutoNormal(trained, create_plates=trained.create_plates))
    history = fit(trained, guide, x, optimizer=optimizer, batch_size=100, epochs=60, progress=False, seed=0)
    # A diagonal guide (row-wise) loses the posterior correlations, a bounded gap; EM is exact.
    assert best - history.final_elbo < (1e-3 if optimizer == "em" else 0.2)


def test_a_subclass_registers_only_under_a_name_of_its_own():
    class QuietLaplace(Laplace):  # inherits the name "laplace"
        pass

    assert get_prior("laplace") == Laplace() and type(get_prior("laplace")) is Laplace


def test_em_refuses_a_prior_without_a_homogeneous_statistic(float64):
    class Smooth(Prior):  # not registered (no name); statistic not homogeneous
        def statistic(self, z):
            return torch.log(torch.cosh(z))

    model = SparseCoding(9, 6, prior=Smooth())
    x, _ = bars(20, side=3, seed=0)
    with pytest.raises(ValueError, match="homogeneous"):
        fit(model, LocalMultivariateNormal(model), x, optimizer="em", batch_size=10, epochs=1, progress=False)


def test_scikit_learn_estimator_with_a_gaussian_prior_is_ppca(float64):
    from pyro_esc.evaluate.ppca import ppca_maximum_likelihood
    from pyro_esc.sklearn import SparseCodingEstimator

    model = gaussian_model(seed=3)
    _, x = model.sample(500)
    estimator = SparseCodingEstimator(3, guide="local-full", solver="lbfgs", prior="gaussian", random_state=0)
    estimator.fit(x.numpy())
    assert abs(estimator.elbo_ - float(ppca_maximum_likelihood(x, 3).log_likelihood)) < 1e-5
    # transform: the exact posterior means of the fitted model.
    fitted = SparseCoding(6, 3, prior="gaussian")
    fitted.set_dictionary(torch.as_tensor(estimator.components_.T))
    fitted.set_scales(torch.as_tensor(estimator.prior_scale_), torch.tensor(estimator.noise_var_))
    mean, _, _ = exact_gaussian_posterior(fitted, x)
    assert torch.allclose(torch.as_tensor(estimator.transform(x.numpy())), mean, atol=1e-6)
    with pytest.raises(ValueError, match="prior must be"):
        SparseCodingEstimator(3, prior="cauchy").fit(x.numpy())
