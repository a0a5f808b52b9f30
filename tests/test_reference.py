"""NUTS reference posteriors, InferenceData export and the guide comparison (pyro_esc.reference)."""

import warnings

import numpy as np
import pytest
import torch

import pyro
from pyro.infer.autoguide import AutoMultivariateNormal

from helpers import exact_posterior, fit_guide_only, fixed_gaussian_guide
from pyro_esc import SparseCoding
from pyro_esc.data import bars
from pyro_esc.reference import (
    compare_to_reference,
    diagnostics,
    guide_inference_data,
    nuts_posterior,
    posterior_moments,
)

# ArviZ announces its refactor on import; not this package's concern.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def bars_problem(num=2):
    """3 x 3 bars (H = 6, overlapping; W has a null direction), parameters fixed at the truth."""
    x, dictionary = bars(num, side=3, seed=11, dtype=torch.float64)
    model = SparseCoding(x.size(1), dictionary.size(1))
    model.set_dictionary(dictionary)
    model.set_scales(prior_scale=3 ** 0.5, noise_var=0.09)
    return model, x


@pytest.fixture(scope="module")
def bars_reference():
    pyro.clear_param_store()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, x = bars_problem()
    finally:
        torch.set_default_dtype(previous)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # converged: no r_hat/ESS/divergence warning
        reference = nuts_posterior(model, x, [0, 1], num_samples=250, warmup_steps=200, seed=0, progress=False)
    pyro.clear_param_store()
    return reference


def fit(model, guide, x):
    """Fit the guide's parameters only (the model's stay at the truth) on the closed-form ELBO."""
    guide(x)
    return fit_guide_only(model, guide, x, steps=200, lr=0.05)


def small_model(prior="laplace"):
    """D = 3, H = 2, parameters fixed: a problem whose posterior is known exactly."""
    model = SparseCoding(3, 2, init="random", prior=prior)
    model.set_dictionary(torch.tensor([[1.0, 0.6], [0.3, 0.8], [0.5, -0.2]]))
    model.set_scales(prior_scale=torch.tensor([1.0, 0.7]), noise_var=0.2)
    return model


def nuts_moments(model, x, points):
    """NUTS's posterior moments of ``points`` and their Monte Carlo standard errors (mean, sd)."""
    reference = nuts_posterior(model, x, points, num_samples=300, warmup_steps=200, seed=1, progress=False)
    mean, std, correlation = posterior_moments(reference)
    table = diagnostics(reference)
    shape = (len(points), model.n_latents)
    return reference, mean, std, correlation, table["mcse_mean"].values.reshape(shape), \
        table["mcse_sd"].values.reshape(shape)


def test_nuts_matches_the_exact_posterior(float64):
    # Laplace prior: posterior moments by numerical integration (helpers.exact_posterior).
    model = small_model()
    _, x = model.sample(3)
    reference, mean, std, correlation, mcse_mean, mcse_sd = nuts_moments(model, x, [2, 0])
    for row, index in enumerate((2, 0)):
        exact_mean, exact_covariance = exact_posterior(x[index], model.dictionary.detach(),
                                                       model.prior_scale.detach(), model.noise_var.detach())[1:]
        exact_std = np.sqrt(np.diag(exact_covariance))
        assert np.all(np.abs(mean[row] - exact_mean) < 4 * mcse_mean[row] + 0.005)
        assert np.all(np.abs(std[row] - exact_std) < 4 * mcse_sd[row] + 0.005)
        exact_correlation = exact_covariance[0, 1] / (exact_std[0] * exact_std[1])
        assert abs(correlation[row, 0, 1] - exact_correlation) < 0.1
    assert reference.posterior.attrs["max_r_hat"] < 1.05


def test_nuts_samples_the_exact_posterior_of_a_gaussian_prior_model(float64):
    # With prior="gaussian" the posterior is Gaussian in closed form: precision W^T W / sigma^2 + diag(1 / s^2).
    model = small_model("gaussian")
    _, x = model.sample(2)
    _, mean, std, _, mcse_mean, mcse_sd = nuts_moments(model, x, [0, 1])
    w, s = model.dictionary.detach(), model.prior_scale.detach()
    covariance = torch.linalg.inv(w.T @ w / 0.2 + torch.diag(s.square().reciprocal()))
    exact_mean = ((x @ w / 0.2) @ covariance).numpy()
    exact_std = covariance.diagonal().sqrt().numpy()
    assert np.all(np.abs(mean - exact_mean) < 4 * mcse_mean + 0.005)
    assert np.all(np.abs(std - exact_std) < 4 * mcse_sd + 0.005)


def test_reference_inference_data_layout(bars_reference):
    reference = bars_reference
    assert reference.posterior["z"].dims == ("chain", "draw", "point", "latent")
    assert reference.posterior["z"].shape == (2, 250, 2, 6)
    assert reference.posterior["point"].values.tolist() == [0, 1]
    assert reference.sample_stats["diverging"].shape == (2, 250)
    assert reference.observed_data["x"].shape == (2, 9)
    assert set(reference.constant_data) == {"dictionary", "prior_scale", "noise_var"}
    table = diagnostics(reference)
    assert {"r_hat", "ess_bulk", "ess_tail"} <= set(table.columns) and len(table) == 12
    assert reference.posterior.attrs["max_r_hat"] == pytest.approx(table["r_hat"].max(), abs=0.01)
    assert reference.posterior.attrs["min_ess_bulk"] == pytest.approx(table["ess_bulk"].min(), abs=1)


def test_full_covariance_guide_is_closer_to_nuts_than_diagonal(float64, bars_reference):
    model, x = bars_problem()
    n_latents = model.n_latents
    diagonal = fit(model, fixed_gaussian_guide(torch.zeros(2, n_latents), scale=0.5 * torch.ones(2, n_latents)), x)
    exports = {"diagonal": guide_inference_data(diagonal, x, [0, 1], num_draws=200)}
    pyro.clear_param_store()  # the second guide reuses the parameter names
    model, x = bars_problem()
    full = fit(model, fixed_gaussian_guide(torch.zeros(2, n_latents), scale_tril=0.5 * torch.eye(n_latents).expand(2, -1, -1)), x)
    exports["full"] = guide_inference_data(full, x, [0, 1], num_draws=200)
    table = compare_to_reference(bars_reference, exports)
    assert list(table.index) == ["diagonal", "full"]
    # Overlapping (and linearly dependent) bars: a diagonal posterior cannot represent the
    # correlations, and it underestimates the spread along them (mean-field VI's known bias).
    assert table.loc["full", "corr_mae"] < 0.5 * table.loc["diagonal", "corr_mae"]
    assert table.loc["full", "corr_frobenius"] < 0.5 * table.loc["diagonal", "corr_frobenius"]
    assert table.loc["full", "std_rmse"] < 0.5 * table.loc["diagonal", "std_rmse"]
    assert table.loc["diagonal", "std_log_ratio"] < -0.2


def test_comparison_formulas_on_known_moments(bars_reference):
    # Approximations built with known moments: errors follow by hand.
    az = pytest.importorskip("arviz")
    mean, std, correlation = posterior_moments(bars_reference)
    covariance = correlation * std[:, :, None] * std[:, None, :]
    coords = {"point": [0, 1], "latent": np.arange(6), "latent_2": np.arange(6)}
    dims = {"z": ["point", "latent"], "q_mean": ["point", "latent"], "q_covariance": ["point", "latent", "latent_2"]}

    def exact(mean_q, covariance_q):
        return az.from_dict(posterior={"z": np.zeros((1, 2, 2, 6))}, constant_data={"q_mean": mean_q, "q_covariance": covariance_q},
                            coords=coords, dims=dims)

    shifted = exact(mean + 0.1, covariance)
    widened = exact(mean, covariance * 4)  # std x 2, same correlations
    independent = exact(mean, np.apply_along_axis(np.diag, -1, std ** 2))
    table = compare_to_reference(bars_reference, {"shifted": shifted, "widened": widened, "independent": independent})
    assert table.loc["shifted"].tolist() == pytest.approx([0.1, 0, 0, 0, 0], abs=1e-12)
    assert table.loc["widened", "std_rmse"] == pytest.approx(np.sqrt(np.mean(std ** 2)))
    assert table.loc["widened", "std_log_ratio"] == pytest.approx(np.log(2))
    off_diagonal = np.abs(correlation[:, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]])
    assert table.loc["independent", "corr_mae"] == pytest.approx(off_diagonal.mean())
    assert table.loc["independent", "corr_frobenius"] == pytest.approx(
        np.mean(np.sqrt((correlation ** 2).sum((1, 2)) - 6)))
    # A second run of NUTS is an approximation too: its errors are the Monte Carlo floor.
    assert table.attrs["reference_mean_mcse"] > 0
    with pytest.raises(ValueError, match="points"):
        compare_to_reference(bars_reference, {"wrong": az.from_dict(
            posterior={"z": np.zeros((1, 3, 2, 6))}, coords={"point": [0, 2], "latent": np.arange(6)},
            dims={"z": ["point", "latent"]})})


def test_guide_export_exact_moments_and_draws(float64):
    model, x = bars_problem(num=4)
    generator = torch.Generator().manual_seed(0)
    loc = torch.randn(4, 6, generator=generator)
    tril = 0.3 * torch.eye(6) + 0.1 * torch.randn(4, 6, 6, generator=generator).tril(-1)
    guide = fixed_gaussian_guide(loc, scale_tril=tril)
    idata = guide_inference_data(guide, x, [3, 1], num_draws=4000, seed=0)
    assert idata.posterior["z"].shape == (1, 4000, 2, 6)
    covariance = (tril @ tril.transpose(-1, -2))[[3, 1]]
    assert np.allclose(idata.constant_data["q_mean"].values, loc[[3, 1]].numpy())
    assert np.allclose(idata.constant_data["q_covariance"].values, covariance.numpy())
    draws = idata.posterior["z"].values[0]
    assert np.allclose(draws.mean(0), loc[[3, 1]].numpy(), atol=4 * 0.4 / np.sqrt(4000))
    assert np.allclose(np.einsum("kpi,kpj->pij", draws - draws.mean(0), draws - draws.mean(0)) / 4000,
                       covariance.numpy(), atol=0.01)
    again = guide_inference_data(guide, x, [3, 1], num_draws=4000, seed=0)
    assert np.array_equal(again.posterior["z"].values, idata.posterior["z"].values)


def test_joint_guide_export_by_sampling(float64):
    # AutoMultivariateNormal has no per-point blocks in the protocol: the export samples it, and
    # the sample moments must match the blocks of its joint covariance (a second route).
    model, x = bars_problem(num=3)
    guide = AutoMultivariateNormal(model, init_scale=0.3)
    guide(x)
    with torch.no_grad():
        guide.scale_tril.unconstrained().add_(0.1 * torch.randn(18, 18).tril(-1))
        joint = guide.get_posterior()
        block = joint.covariance_matrix.reshape(3, 6, 3, 6)[2, :, 2, :].numpy()
        loc = joint.loc.reshape(3, 6)[2].numpy()
    idata = guide_inference_data(guide, x, [2], num_draws=4000, seed=1)
    assert "constant_data" not in idata.groups()
    mean, std, _ = posterior_moments(idata)
    assert np.allclose(mean[0], loc, atol=4 * np.sqrt(np.diag(block).max() / 4000))
    assert np.allclose(std[0], np.sqrt(np.diag(block)), rtol=0.1)


def test_rejects_bad_arguments(float64):
    model, x = bars_problem()
    with pytest.raises(ValueError, match="points"):
        nuts_posterior(model, x, [0, 5], progress=False)
    with pytest.raises(ValueError, match="points"):
        nuts_posterior(model, x, [1, 1], progress=False)
    with pytest.raises(ValueError, match="num_chains"):
        nuts_posterior(model, x, [0], num_chains=0, progress=False)
    with pytest.raises(ValueError, match="target_accept_prob"):
        nuts_posterior(model, x, [0], target_accept_prob=1.5, progress=False)
    with pytest.raises(ValueError, match="SparseCoding"):
        nuts_posterior(lambda x: None, x, [0])
    with pytest.raises(ValueError, match="reference"):
        compare_to_reference(object(), {})
    with pytest.raises(ValueError, match="InferenceData"):
        diagnostics(object())
