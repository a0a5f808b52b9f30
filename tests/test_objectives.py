"""EntropyELBO and AnalyticELBO against Trace_ELBO, autograd and each other (docs/theory.md, Theorem 1 to Gaussian posteriors)."""

import pytest
import torch

import pyro
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

from helpers import (AUTOGUIDES, assert_analytic_elbo_matches_trace_elbo, guide_parameters, guide_problem,
                     monte_carlo_check, randomize_guide)
from pyro_esc import AnalyticELBO, EntropyELBO, SparseCoding
from pyro_esc.data import bars


def relative_difference(a, b):
    return abs(a - b) / max(abs(a), abs(b))


@pytest.mark.parametrize("guide_name", AUTOGUIDES)
def test_entropy_elbo_equals_analytic_elbo_at_theorem2_scales(float64, guide_name):
    model, guide, x = guide_problem(guide_name)
    entropy_loss = EntropyELBO().loss(model, guide, x)
    EntropyELBO().update(model, guide, x)  # the explicit call that writes lambda*, sigma^2* into the model
    analytic_loss = AnalyticELBO().loss(model, guide, x)
    assert relative_difference(entropy_loss, analytic_loss) < 1e-8


@pytest.mark.parametrize("guide_name", AUTOGUIDES)
def test_entropy_elbo_does_not_depend_on_the_models_scales(float64, guide_name):
    model, guide, x = guide_problem(guide_name)
    first = EntropyELBO().loss(model, guide, x)
    model.set_scales(prior_scale=torch.rand(model.n_latents) + 0.1, noise_var=3.0)
    assert relative_difference(EntropyELBO().loss(model, guide, x), first) < 1e-12


@pytest.mark.parametrize("guide_name", AUTOGUIDES)
@pytest.mark.parametrize("scales", ["optimal", "arbitrary"])
def test_analytic_elbo_agrees_with_trace_elbo(float64, guide_name, scales):
    model, guide, x = guide_problem(guide_name)
    assert_analytic_elbo_matches_trace_elbo(model, guide, x, scales)


def scale_gradients(model, guide, x):
    loss = AnalyticELBO().differentiable_loss(model, guide, x)
    params = [pyro.param("prior_scale").unconstrained(), pyro.param("noise_var").unconstrained()]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("guide_name", AUTOGUIDES)
def test_analytic_elbo_is_stationary_in_the_scales_at_theorem2(float64, guide_name):
    model, guide, x = guide_problem(guide_name)
    EntropyELBO().update(model, guide, x)
    at_optimum = scale_gradients(model, guide, x)
    # A reference magnitude: the same gradients 10% away from the optimum.
    model.set_scales(prior_scale=model.prior_scale.detach() * 1.1, noise_var=model.noise_var.detach() * 1.1)
    nearby = scale_gradients(model, guide, x)
    for optimum, reference in zip(at_optimum, nearby):
        assert optimum.abs().max() < 1e-9 * reference.abs().max()


@pytest.mark.parametrize("guide_name", AUTOGUIDES)
def test_gradients_of_entropy_and_analytic_elbo_agree_at_theorem2(float64, guide_name):
    model, guide, x = guide_problem(guide_name)
    params = [value for _, value in guide_parameters(guide)] + [pyro.param("raw_dictionary").unconstrained()]
    EntropyELBO().update(model, guide, x)
    entropy_grads = torch.autograd.grad(EntropyELBO().differentiable_loss(model, guide, x), params)
    analytic_grads = torch.autograd.grad(AnalyticELBO().differentiable_loss(model, guide, x), params)
    for entropy_grad, analytic_grad in zip(entropy_grads, analytic_grads):
        assert entropy_grad.abs().max() > 0
        assert torch.allclose(entropy_grad, analytic_grad, rtol=1e-8, atol=1e-10 * analytic_grad.abs().max())


def test_theorem2_scales_match_monte_carlo_moments(float64):
    # A second route to lambda* and sigma^2*: sample the guide and average |z| and ||x - W z||^2.
    model, guide, x = guide_problem("AutoNormal")
    EntropyELBO().update(model, guide, x)
    with torch.no_grad():
        loc, scale = guide.locs.z, guide.scales.z
        z = loc + scale * torch.randn((20000,) + loc.shape)
        prior_scale = z.abs().mean((0, 1))
        noise_var = (x - z @ model.dictionary.T).square().mean()
    assert torch.allclose(model.prior_scale.detach(), prior_scale, rtol=1e-2)
    assert torch.isclose(model.noise_var.detach(), noise_var, rtol=1e-2)


def test_one_svi_step_moves_every_parameter_it_should():
    x, _ = bars(50, side=3, seed=0)
    model = SparseCoding(x.size(1), 6)
    guide = AutoNormal(model)
    elbo = EntropyELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    svi.step(x)  # first step initialises everything
    before = {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}
    at_start = elbo.terms(model, guide, x)
    svi.step(x)
    after = dict(pyro.get_param_store().named_parameters())
    for name in ("raw_dictionary", "AutoNormal.locs.z", "AutoNormal.scales.z"):
        assert not torch.equal(before[name], after[name].detach()), f"{name} did not move"
    # The step writes lambda and sigma^2 of the parameters it evaluated (Theorem 2's values at the step's
    # start: a plain SVI loop never leaves the model at its initial scales); update sets them to those of the
    # guide after the step; and they are never handed to the optimiser.
    torch.testing.assert_close(model.prior_scale.detach(), at_start.prior_scale.detach())
    torch.testing.assert_close(model.noise_var.detach(), at_start.noise_var.detach())
    optimised = {id(param) for param in svi.optim.optim_objs}
    assert id(after["prior_scale"]) not in optimised and id(after["noise_var"]) not in optimised
    assert id(after["raw_dictionary"]) in optimised
    expected = elbo.terms(model, guide, x)
    elbo.update(model, guide, x)
    assert torch.allclose(model.prior_scale.detach(), expected.prior_scale.detach())
    assert torch.allclose(model.noise_var.detach(), expected.noise_var.detach())
    with poutine.trace(param_only=True) as capture:  # what SVI hands to its optimiser
        elbo.loss_and_grads(model, guide, x)
    assert set(capture.trace.nodes) == {"raw_dictionary", "AutoNormal.locs.z", "AutoNormal.scales.z"}


def test_analytic_elbo_trains_the_scales_by_gradient():
    x, _ = bars(50, side=3, seed=0)
    model = SparseCoding(x.size(1), 6)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=AnalyticELBO())
    svi.step(x)
    before = {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}
    svi.step(x)
    for name, value in pyro.get_param_store().named_parameters():
        assert not torch.equal(before[name], value.detach()), f"{name} did not move"


def test_minibatch_estimates_are_scaled_to_the_data_set(float64):
    model, guide, x = guide_problem("AutoNormal", num=40)
    full = EntropyELBO().loss(model, guide, x)
    everything = torch.arange(x.size(0))
    assert relative_difference(EntropyELBO().loss(model, guide, x, subsample=everything), full) < 1e-12
    batch = torch.tensor([3, 17, 5, 28, 39, 0, 11, 22])
    entropy_batch = EntropyELBO(minibatch_statistics="batch").loss(model, guide, x, subsample=batch)
    EntropyELBO(minibatch_statistics="batch").update(model, guide, x, subsample=batch)
    # An independent route: the full-batch closed-form ELBO of a model that sees only
    # the batch points, at the batch's lambda*, sigma^2* (just written), times N/B.
    loc = pyro.param("AutoNormal.locs.z").unconstrained().detach()[batch]
    scale = pyro.param("AutoNormal.scales.z").unconstrained().detach()[batch]
    dictionary, prior_scale, noise_var = (model.dictionary.detach(), model.prior_scale.detach(),
                                          model.noise_var.detach())
    pyro.clear_param_store()
    small_model = SparseCoding(x.size(1), model.n_latents)
    small_model.set_dictionary(dictionary)
    small_model.set_scales(prior_scale, noise_var)
    small_guide = AutoNormal(small_model)
    small_guide(x[batch])
    with torch.no_grad():
        pyro.param("AutoNormal.locs.z").unconstrained().copy_(loc)
        pyro.param("AutoNormal.scales.z").unconstrained().copy_(scale)
    expected = AnalyticELBO().loss(small_model, small_guide, x[batch]) * x.size(0) / batch.numel()
    assert relative_difference(entropy_batch, expected) < 1e-8


def test_subsampled_analytic_elbo_agrees_with_trace_elbo(float64):
    x, _ = bars(40, side=3, seed=3, dtype=torch.float64)
    model = SparseCoding(x.size(1), 6)
    guide = AutoNormal(model, create_plates=model.create_plates)
    randomize_guide(guide, x)
    batch = torch.tensor([3, 17, 5, 28, 39, 0, 11, 22])
    analytic = AnalyticELBO().loss(model, guide, x, subsample=batch)
    trace_elbo, standard_error, _ = monte_carlo_check(model, guide, x, subsample=batch, num_particles=3000)
    assert abs(analytic - trace_elbo) < 4 * standard_error


def test_random_subsample_size_is_drawn_once_per_evaluation(float64):
    model, guide, x = guide_problem("AutoNormal", num=40)
    elbo = EntropyELBO(minibatch_statistics="batch")
    pyro.set_rng_seed(5)
    value = elbo.loss(model, guide, x, subsample_size=10)
    pyro.set_rng_seed(5)
    batch = torch.randperm(40)[:10]
    assert relative_difference(value, elbo.loss(model, guide, x, subsample=batch)) < 1e-12
    assert relative_difference(value, EntropyELBO(minibatch_statistics="batch").loss(model, guide, x)) > 1e-6


def test_running_statistics_with_the_whole_data_set_as_batch_is_full_batch(float64):
    model, guide, x = guide_problem("AutoNormal", num=40)
    params = [value for _, value in guide_parameters(guide)] + [pyro.param("raw_dictionary").unconstrained()]
    full = EntropyELBO().differentiable_loss(model, guide, x)
    full_grads = torch.autograd.grad(full, params)
    running = EntropyELBO(minibatch_statistics="running")
    value = running.differentiable_loss(model, guide, x, subsample=torch.randperm(40))
    assert relative_difference(value.item(), full.item()) < 1e-12
    for grad, full_grad in zip(torch.autograd.grad(value, params), full_grads):
        assert torch.allclose(grad, full_grad, rtol=1e-10, atol=1e-12)


def test_running_statistics_value_is_full_data_and_gradient_is_scaled_batch_gradient(float64):
    model, guide, x = guide_problem("AutoNormal", num=40)
    loc = pyro.param("AutoNormal.locs.z").unconstrained()
    full_value = EntropyELBO().differentiable_loss(model, guide, x)
    (full_grad,) = torch.autograd.grad(full_value, [loc])
    full_scales = model.prior_scale.detach().clone(), model.noise_var.detach().clone()
    batch = torch.tensor([4, 9, 33, 20, 1])
    running = EntropyELBO()
    value = running.differentiable_loss(model, guide, x, subsample=batch)
    (grad,) = torch.autograd.grad(value, [loc])
    # The cache is current, so the value and the written scales are the full-data ones ...
    assert relative_difference(value.item(), full_value.item()) < 1e-12
    assert torch.allclose(model.prior_scale.detach(), full_scales[0])
    assert torch.allclose(model.noise_var.detach(), full_scales[1])
    # ... and the gradient is the batch rows of the full gradient, times N / B, as in Pyro's subsampling.
    expected = torch.zeros_like(full_grad)
    expected[batch] = full_grad[batch] * 40 / 5
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-14)
    # Batch statistics instead estimate lambda*, sigma^2* from the batch: a different value.
    batch_value = EntropyELBO(minibatch_statistics="batch").loss(model, guide, x, subsample=batch)
    assert relative_difference(batch_value, full_value.item()) > 1e-4


def test_running_statistics_with_an_amortised_guide_and_the_data_set_as_batch(float64):
    from pyro_esc import AmortizedNormal

    x, _ = bars(40, side=3, seed=3, dtype=torch.float64)
    model = SparseCoding(x.size(1), 6)
    guide = AmortizedNormal(x.size(1), 6, hidden=(8,), covariance="full")
    model(x)  # an amortised guide does not run the model: initialise it here
    randomize_guide(guide, x)
    params = [value for _, value in guide_parameters(guide)] + [pyro.param("raw_dictionary").unconstrained()]
    full = EntropyELBO().differentiable_loss(model, guide, x)
    full_grads = torch.autograd.grad(full, params)
    batched = EntropyELBO().differentiable_loss(model, guide, x, subsample=torch.randperm(40))
    assert relative_difference(batched.item(), full.item()) < 1e-12
    for grad, full_grad in zip(torch.autograd.grad(batched, params), full_grads):
        assert torch.allclose(grad, full_grad, rtol=1e-10, atol=1e-12)
