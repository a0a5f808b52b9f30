"""encode: posteriors for new data under a trained model, checked against independent routes.

- a per-point fit written here (torch's L-BFGS on one point at a time, the ELBO from torch's own
  distributions) reaches the same posteriors and ELBO as encode's joint fit;
- held_out_elbo on encode's result agrees with Pyro's Monte Carlo Trace_ELBO;
- encode on the training data recovers what training found (nothing better is left for the
  posteriors at the trained model), and changes neither the model nor the trained guide.
"""

import math

import pytest
import torch

import pyro
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal

from helpers import fixed_gaussian_guide, monte_carlo_check, one_point_optimum
from pyro_esc import (AmortizedNormal, GaussianPosterior, LocalMultivariateNormal, SparseCoding, encode, fit,
                      held_out_elbo, log_likelihood)
from pyro_esc.data import bars


def trained(make_guide, n=200, side=3, seed=0):
    x, _ = bars(n, side=side, noise=0.3, seed=seed)[:2]
    x = x.double()
    model = SparseCoding(x.size(1), 2 * side)
    guide = make_guide(model)
    fit(model, guide, x, steps=300, tol=None, progress=False)
    return model, guide, x


@pytest.mark.parametrize("family", ["local-full", "local-diag"])
def test_encode_reaches_the_per_point_optimum_found_one_point_at_a_time(family):
    make = (LocalMultivariateNormal if family == "local-full"
            else lambda model: AutoNormal(model, create_plates=model.create_plates))
    model, guide, _ = trained(make)
    x_new = bars(6, side=3, noise=0.3, seed=7)[0].double()
    posterior = encode(model, guide, x_new)
    assert isinstance(posterior, GaussianPosterior) and posterior.num_points == 6
    total = held_out_elbo(model, posterior, x_new) * 6
    reference_total = 0.0
    for n in range(6):
        loc, elbo = one_point_optimum(model, x_new[n], full=family == "local-full")
        reference_total += elbo
        assert torch.allclose(posterior.mean[n], loc, atol=2e-4), n
    assert total == pytest.approx(reference_total, abs=1e-6 * 6 + 1e-5)


def test_held_out_elbo_of_an_encoding_agrees_with_monte_carlo_trace_elbo():
    model, guide, _ = trained(LocalMultivariateNormal)
    x_new = bars(40, side=3, noise=0.3, seed=3)[0].double()
    posterior = encode(model, guide, x_new)
    exact = held_out_elbo(model, posterior, x_new)
    with pyro.get_param_store().scope():
        mc_guide = fixed_gaussian_guide(posterior.mean, scale_tril=posterior.scale_tril)
        value, standard_error, _ = monte_carlo_check(model, mc_guide, x_new, num_particles=2000)
    assert abs(-value / 40 - exact) < 4 * standard_error / 40 + 1e-9


def test_encode_on_the_training_data_recovers_the_trained_posteriors_and_changes_nothing():
    model, guide, x = trained(LocalMultivariateNormal)
    store = pyro.get_param_store()
    before = {name: value.detach().clone() for name, value in store.named_parameters()}
    rng = torch.get_rng_state()
    posterior = encode(model, guide, x)
    assert {name: value.detach() for name, value in store.named_parameters()}.keys() == before.keys()
    for name, value in store.named_parameters():
        assert torch.equal(value.detach(), before[name]), name
    assert torch.equal(torch.get_rng_state(), rng)
    trained_elbo = held_out_elbo(model, guide, x)
    encoded_elbo = held_out_elbo(model, posterior, x)
    # Refitting the posteriors at the trained model can only keep or raise the ELBO, and training had
    # nearly converged: the two agree closely.
    assert encoded_elbo >= trained_elbo - 1e-9
    assert encoded_elbo - trained_elbo < 0.05


def test_amortised_guides_encode_with_their_encoder_and_log_likelihood_reads_the_result():
    x = bars(100, side=3, noise=0.3, seed=0)[0]
    model = SparseCoding(9, 6)
    guide = AmortizedNormal(9, 6)
    fit(model, guide, x, steps=20, lr=0.01, progress=False)
    x_new = bars(10, side=3, noise=0.3, seed=5)[0]
    posterior = encode(model, guide, x_new)
    loc, scale = guide.encode(x_new)
    assert torch.allclose(posterior.mean, loc.detach()) and torch.allclose(posterior.stddev, scale.detach())
    estimate = log_likelihood(model, posterior, x_new, num_samples=200, progress=False, seed=0)
    # The importance-weighted bound lies above the ELBO of its proposal (on average; per point here, K = 200).
    assert float(estimate.mean) >= held_out_elbo(model, posterior, x_new) - 1e-6


def test_a_joint_guide_gets_a_new_joint_posterior():
    model, guide, _ = trained(AutoMultivariateNormal, n=60)
    x_new = bars(5, side=3, noise=0.3, seed=9)[0].double()
    posterior = encode(model, guide, x_new)
    assert posterior.is_joint and posterior.num_points == 5
    assert math.isfinite(held_out_elbo(model, posterior, x_new))


def test_bad_input_is_a_clear_error():
    model, guide, x = trained(LocalMultivariateNormal, n=40)
    with pytest.raises(ValueError, match="columns"):
        encode(model, guide, torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="SparseCoding"):
        encode(object(), guide, x)
    with pytest.raises(ValueError, match="AutoDelta"):
        encode(model, AutoDelta(model), x)
    with pytest.raises(ValueError, match="describes 40 points"):
        held_out_elbo(model, encode(model, guide, x), x[:10])


def test_one_point_or_identical_points_can_be_encoded():
    # fit rejects constant data when it trains the model (the ELBO is unbounded); with the model fixed it is not.
    model, guide, _ = trained(LocalMultivariateNormal, n=60)
    point = bars(1, side=3, noise=0.3, seed=11)[0].double()
    alone = encode(model, guide, point)
    twice = encode(model, guide, torch.cat([point, point]))
    assert alone.num_points == 1 and torch.allclose(twice.mean[0], twice.mean[1], atol=1e-6)
    assert torch.allclose(alone.mean[0], twice.mean[0], atol=1e-4)
