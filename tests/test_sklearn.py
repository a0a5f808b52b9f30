"""pyro_esc.sklearn.SparseCodingEstimator: scikit-learn's API, its estimator checks, and the numbers.

The estimator checks run through ``estimator_checks_generator`` (scikit-learn >= 1.6), one
test per check. Checks expected to fail are skipped, not run (they cost time and prove nothing):

- local guides ("local-full", "local-diag"): ``check_methods_subset_invariance`` and
  ``check_methods_sample_order_invariance``. A local guide has no encoder, so ``transform``
  fits the new points' posteriors with L-BFGS, which stops at a tolerance: the codes of a
  subset or a permutation of the points agree with those of all points only to that tolerance
  (1e-7 to 1e-3, measured), not to the checks' 1e-7 relative / 1e-9 absolute.
- the amortised guide passes every check.

Fits are tiny (a few steps, small data) so that the file runs in well under a minute.
"""

import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import estimator_checks_generator

import pyro
from pyro_esc import LocalMultivariateNormal, SparseCoding, encode, held_out_elbo
from pyro_esc.data import bars
from pyro_esc.sklearn import LOCAL_GUIDE_EXPECTED_FAILED_CHECKS, SparseCodingEstimator

#: The checks expected to fail, by guide: none (local guides solve each point on its own).
EXPECTED_FAILED = {
    "local-full": {},
    "amortized": {},
}
EXPECTED_FAILED["local-diag"] = EXPECTED_FAILED["local-full"]

# Fits of a few steps do not converge, by design (test_unconverged_fit_warns... checks the warning).
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _small(guide, **params):
    """An estimator sized for tests: two latents, a few training and encoding steps."""
    options = dict(n_components=2, guide=guide, max_iter=3, transform_max_iter=10, hidden=(8,), random_state=0)
    options.update(params)
    return SparseCodingEstimator(**options)


def _check_name(check):
    while isinstance(check, functools.partial):
        check = check.func
    return check.__name__


def _estimator_checks():
    for guide in ("local-full", "local-diag", "amortized"):
        generator = estimator_checks_generator(_small(guide), expected_failed_checks=EXPECTED_FAILED[guide],
                                               mark="skip")
        for estimator, check in generator:
            yield pytest.param(estimator, check, id=f"{guide}-{_check_name(check)}")


@pytest.mark.parametrize("estimator, check", list(_estimator_checks()))
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_expected_failed_checks_are_the_documented_ones():
    assert LOCAL_GUIDE_EXPECTED_FAILED_CHECKS == EXPECTED_FAILED["local-full"] == {}
    assert not EXPECTED_FAILED["amortized"]


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def bars_data():
    """Bars with noise sigma = 0.1: training (100, 16) and held-out (30, 16), float64 numpy."""
    x, _ = bars(100, side=4, noise=0.1, seed=0, dtype=torch.float64)
    x_test, _ = bars(30, side=4, noise=0.1, seed=1, dtype=torch.float64)
    return x.numpy(), x_test.numpy()


@pytest.fixture(scope="module")
def fitted_bars(bars_data):
    """local-full on bars, 300 L-BFGS steps (nearly converged; fitted once for the module)."""
    x, _ = bars_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # module-scoped: pytestmark does not reach it
        return SparseCodingEstimator(8, guide="local-full", max_iter=300, random_state=0).fit(x)


@pytest.fixture(scope="module")
def small_data():
    rng = np.random.RandomState(0)
    return rng.laplace(size=(40, 5)) @ rng.normal(size=(5, 6)) + 0.1 * rng.normal(size=(40, 6))


# ---------------------------------------------------------------- the numbers


def test_components_orientation_and_attributes(fitted_bars, bars_data):
    est = fitted_bars
    assert est.components_.shape == (8, 16)  # scikit-learn's (n_components, n_features)
    np.testing.assert_allclose(np.linalg.norm(est.components_, axis=1), 1.0, atol=1e-12)
    # Code e_h decodes to dictionary element h: the rows of components_ are the elements.
    np.testing.assert_allclose(est.inverse_transform(np.eye(8)), est.components_, atol=1e-14)
    assert est.prior_scale_.shape == (8,) and np.all(est.prior_scale_ > 0)
    assert est.n_features_in_ == 16 and est.n_components_ == 8
    assert est.n_iter_ >= 1 and np.isfinite(est.elbo_)
    assert list(est.get_feature_names_out()) == [f"sparsecodingestimator{h}" for h in range(8)]


def test_transform_inverse_transform_reconstruct_bars(fitted_bars, bars_data):
    x, x_test = bars_data
    est = fitted_bars
    # The learned noise variance is near the generating sigma^2 = 0.01.
    assert 0.5 * 0.01 < est.noise_var_ < 1.5 * 0.01
    codes, stds = est.transform(x_test, return_std=True)
    assert codes.shape == stds.shape == (30, 8) and codes.dtype == np.float64
    assert np.all(stds > 0)
    reconstruction = est.inverse_transform(codes)
    assert reconstruction.shape == x_test.shape
    # Held-out reconstructions are within the noise (sigma = 0.1 per pixel), far below the data's scale.
    rmse = np.sqrt(np.mean((reconstruction - x_test) ** 2))
    assert rmse < 0.1 < np.sqrt(np.mean(x_test ** 2)) / 5
    # The codes explain the data far better than the training mean does.
    assert rmse < np.sqrt(np.mean((x_test - x.mean(0)) ** 2)) / 5


def test_score_is_the_held_out_elbo_of_the_fitted_model(fitted_bars, bars_data):
    _, x_test = bars_data
    est = fitted_bars
    score = est.score(x_test)
    # The same number, computed independently from the fitted attributes with the library's API.
    with pyro.get_param_store().scope():
        model = SparseCoding(16, 8).to(torch.float64)
        model.set_dictionary(torch.tensor(est.components_.T))
        model.set_scales(torch.tensor(est.prior_scale_), torch.tensor(est.noise_var_, dtype=torch.float64))
        x = torch.tensor(x_test)
        posterior = encode(model, LocalMultivariateNormal(model), x)
        expected = held_out_elbo(model, posterior, x)
    # encode's L-BFGS stops at a tolerance (relative ELBO change 1e-9), so rounding differences of
    # 1e-16 in W move the codes by up to ~1e-3; the ELBO is stationary there and agrees far closer.
    assert score == pytest.approx(expected, rel=1e-7)


def test_pipeline_with_standard_scaler(small_data):
    pipeline = Pipeline([("scale", StandardScaler()), ("code", _small("local-full", max_iter=20))])
    codes = pipeline.fit_transform(small_data)
    assert codes.shape == (40, 2)
    scaled = pipeline.named_steps["scale"].transform(small_data)
    np.testing.assert_allclose(codes, pipeline.named_steps["code"].transform(scaled))
    assert pipeline.score(small_data) == pytest.approx(pipeline.named_steps["code"].score(scaled))
    assert pipeline.inverse_transform(codes).shape == small_data.shape


def test_clone_get_params_set_params(small_data):
    est = _small("amortized", max_iter=30)
    params = est.get_params()
    assert params["n_components"] == 2 and params["guide"] == "amortized" and params["random_state"] == 0
    assert set(params) == {"n_components", "guide", "solver", "max_iter", "tol", "n_init", "learning_rate",
                           "hidden", "transform_max_iter", "transform_tol", "random_state", "prior", "verbose"}
    est.fit(small_data)
    copy = clone(est)
    assert copy.get_params() == params
    assert not hasattr(copy, "components_")
    with pytest.raises(NotFittedError):
        copy.transform(small_data)
    # Same parameters and seed: the same fit.
    np.testing.assert_array_equal(copy.fit(small_data).components_, est.components_)
    # set_params changes the fit.
    assert copy.set_params(n_components=3) is copy
    assert copy.fit(small_data).components_.shape == (3, 6)
    assert copy.transform(small_data).shape == (40, 3)
    with pytest.raises(ValueError, match="alpha"):
        copy.set_params(alpha=1.0)  # no alpha: sparsity is learned


@pytest.mark.parametrize("guide", ["local-full", "amortized"])
def test_estimators_do_not_disturb_each_other(guide, small_data):
    first = _small(guide, max_iter=20).fit(small_data)
    codes = first.transform(small_data)
    score = first.score(small_data)
    # A second estimator of the same family (same Pyro parameter names), other data and size.
    rng = np.random.RandomState(1)
    _small(guide, n_components=3, max_iter=20, random_state=1).fit(rng.normal(size=(30, 6)))
    np.testing.assert_array_equal(first.transform(small_data), codes)
    assert first.score(small_data) == score
    # Refitting the first gives the same again; a pickled copy transforms alike.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(first)).transform(small_data), codes)
    np.testing.assert_array_equal(first.fit(small_data).transform(small_data), codes)


def test_global_state_is_untouched(small_data):
    pyro.param("mine", torch.ones(2))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    est = _small("local-diag").fit(small_data)
    est.transform(small_data[:3])
    est.score(small_data[:3])
    assert list(pyro.get_param_store().keys()) == ["mine"]
    assert torch.equal(torch.rand(3), expected)


def test_random_state_none_and_int(small_data):
    a = _small("amortized", random_state=None).fit(small_data)
    b = _small("amortized", random_state=np.random.RandomState(0)).fit(small_data)
    assert np.all(np.isfinite(a.components_)) and np.all(np.isfinite(b.components_))
    c = _small("amortized", random_state=7).fit(small_data)
    d = _small("amortized", random_state=7).fit(small_data)
    np.testing.assert_array_equal(c.components_, d.components_)


def test_one_sample_and_identical_samples_transform(small_data):
    est = _small("local-full", transform_max_iter=None).fit(small_data)
    all_codes = est.transform(small_data[:4])
    one = est.transform(small_data[:1])
    assert one.shape == (1, 2)
    np.testing.assert_allclose(one, all_codes[:1], atol=1e-4)
    same = est.transform(np.repeat(small_data[:1], 3, axis=0))
    np.testing.assert_allclose(same, np.repeat(one, 3, axis=0), atol=1e-4)


def test_unconverged_fit_warns_with_sklearns_convergence_warning(small_data):
    with pytest.warns(ConvergenceWarning, match="step limit"):
        SparseCodingEstimator(2, max_iter=2, random_state=0).fit(small_data)


@pytest.mark.parametrize("params, match", [
    (dict(n_components=0), "n_components"),
    (dict(n_components=2.5), "n_components"),
    (dict(guide="joint"), "guide"),
    (dict(solver="sgd"), "solver"),
    (dict(max_iter=0), "max_iter"),
    (dict(transform_max_iter=-1), "transform_max_iter"),
    (dict(tol=-1.0), "tol"),
    (dict(n_init=0), "n_init"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(hidden=8), "hidden"),
    (dict(transform_tol=0.0), "transform_tol"),
])
def test_bad_parameters_raise_value_error_naming_them(params, match, small_data):
    est = SparseCodingEstimator(**params)  # no validation in __init__ (scikit-learn's convention)
    with pytest.raises(ValueError, match=match):
        est.fit(small_data)


def test_bad_data_raise_value_error(small_data):
    est = _small("amortized")
    bad = small_data.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.fit(bad)
    with pytest.raises(ValueError, match="1 sample"):
        est.fit(small_data[:1])
    with pytest.raises(ValueError, match="X must vary"):
        est.fit(np.ones((5, 3)))
    with pytest.raises(ValueError, match="2D array"):
        est.fit(small_data[0])
    est.fit(small_data)
    with pytest.raises(ValueError, match="X has 5 features"):
        est.transform(small_data[:, :5])
    with pytest.raises(ValueError, match="X has 5 features"):
        est.score(small_data[:, :5])
    with pytest.raises(ValueError, match="n_components_ = 2"):
        est.inverse_transform(np.ones((3, 5)))
    bad_codes = np.ones((3, 2))
    bad_codes[1, 1] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        est.inverse_transform(bad_codes)


def test_verbose_shows_fits_progress_and_the_default_is_silent(small_data, capsys):
    # The estimator trained silently whatever it cost (78 s for local-full on 300 digits); verbose=1 shows fit's bar.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _small("local-diag").fit(small_data)
        assert "fit" not in capsys.readouterr().err
        _small("local-diag", verbose=1).fit(small_data)
    assert "fit" in capsys.readouterr().err
