"""The SparseCoding Pyro model: sites, shapes, initialisation, setters, sampling."""

import pytest
import torch

import pyro
from pyro import poutine

from pyro_esc import SparseCoding
from pyro_esc.data import bars


def test_trace_has_the_contracted_sites_and_shapes():
    x, _ = bars(20, side=3)
    model = SparseCoding(9, 6)
    trace = poutine.trace(model).get_trace(x)
    assert trace.nodes["data"]["type"] == "sample" and trace.nodes["data"]["value"].shape == (20,)
    z_site, x_site = trace.nodes["z"], trace.nodes["x"]
    assert z_site["fn"].event_shape == (6,) and z_site["fn"].batch_shape == (20,)
    assert x_site["is_observed"] and x_site["fn"].event_shape == (9,)
    assert torch.equal(x_site["value"], x)
    assert [frame.name for frame in z_site["cond_indep_stack"]] == ["data"]
    assert isinstance(z_site["fn"].base_dist, pyro.distributions.Laplace)


def test_log_density_matches_the_formula(float64):
    # An independent route to the model's joint density: write it out by hand.
    x, _ = bars(10, side=3, dtype=torch.float64)
    model = SparseCoding(9, 6)
    trace = poutine.trace(model).get_trace(x)
    z, dictionary = trace.nodes["z"]["value"], model.dictionary.detach()
    prior_scale, noise_var = model.prior_scale.detach(), model.noise_var.detach()
    log_prior = (-(2 * prior_scale).log() - z.abs() / prior_scale).sum()
    residual = x - z @ dictionary.T
    log_likelihood = (-0.5 * (2 * torch.pi * noise_var).log() - residual.square() / (2 * noise_var)).sum()
    assert torch.isclose(trace.log_prob_sum(), log_prior + log_likelihood)


def test_dictionary_has_unit_columns_and_is_differentiable():
    model = SparseCoding(9, 6)
    assert torch.allclose(model.dictionary.norm(dim=0), torch.ones(6))
    model.dictionary.sum().backward()
    assert model.raw_dictionary_unconstrained.grad is not None


def test_first_data_initialise_the_model_in_their_dtype(float64):
    x, _ = bars(30, side=3, dtype=torch.float64)
    model = SparseCoding(9, 6)
    model(x)
    assert model.dictionary.dtype == torch.float64 and model.noise_var.dtype == torch.float64
    # Every column is a normalised data point.
    columns = model.dictionary.detach()
    normalised = x / x.norm(dim=1, keepdim=True)
    assert torch.allclose((normalised @ columns).max(0).values, torch.ones(6))
    assert bool(model.initialized)
    # Later data do not re-initialise.
    before = columns.clone()
    model(x[:5])
    assert torch.equal(model.dictionary.detach(), before)


def test_set_dictionary_prevents_initialisation_from_data():
    x, true_dictionary = bars(30, side=3)
    model = SparseCoding(9, 6)
    model.set_dictionary(true_dictionary * 3)
    model(x)
    assert torch.allclose(model.dictionary.detach(), true_dictionary)


def test_random_initialisation_keeps_the_random_columns():
    x, _ = bars(30, side=3)
    model = SparseCoding(9, 6, init="random")
    before = model.dictionary.detach().clone()
    model(x)
    assert torch.allclose(model.dictionary.detach(), before)


def test_mismatched_dtype_after_initialisation_is_a_clear_error():
    x, _ = bars(30, side=3)
    model = SparseCoding(9, 6)
    model(x)
    with pytest.raises(ValueError, match="dtype"):
        model(x.double())


def test_set_scales_validates_and_updates_in_place():
    model = SparseCoding(9, 6)
    parameter = model.prior_scale_unconstrained
    model.set_scales(prior_scale=torch.full((6,), 0.5), noise_var=0.25)
    assert torch.allclose(model.prior_scale, torch.full((6,), 0.5))
    assert torch.isclose(model.noise_var, torch.tensor(0.25))
    assert model.prior_scale_unconstrained is parameter
    model.set_scales(prior_scale=2.0)
    assert torch.allclose(model.prior_scale, torch.full((6,), 2.0))
    with pytest.raises(ValueError, match="prior_scale"):
        model.set_scales(prior_scale=torch.full((6,), -1.0))
    with pytest.raises(ValueError, match="prior_scale"):
        model.set_scales(prior_scale=torch.ones(5))
    with pytest.raises(ValueError, match="noise_var"):
        model.set_scales(noise_var=float("nan"))
    with pytest.raises(ValueError, match="dictionary"):
        model.set_dictionary(torch.zeros(9, 6))


def test_sample_draws_from_the_generative_model(float64):
    model = SparseCoding(9, 6)
    model.set_scales(prior_scale=torch.linspace(0.5, 2.0, 6), noise_var=0.04)
    z, x = model.sample(20000)
    assert z.shape == (20000, 6) and x.shape == (20000, 9)
    # Laplace(0, lambda): E|z| = lambda; residual variance = sigma^2.
    assert torch.allclose(z.abs().mean(0), torch.linspace(0.5, 2.0, 6), rtol=0.05)
    residual = x - z @ model.dictionary.detach().T
    assert torch.isclose(residual.var(), torch.tensor(0.04), rtol=0.05)


def test_subsampling_scales_the_log_density():
    x, _ = bars(40, side=3)
    model = SparseCoding(9, 6)
    trace = poutine.trace(model).get_trace(x, subsample=torch.arange(10))
    assert trace.nodes["x"]["scale"] == 4.0
    assert torch.equal(trace.nodes["x"]["value"], x[:10])
    trace = poutine.trace(model).get_trace(x, subsample_size=8)
    assert trace.nodes["x"]["value"].shape == (8, 9) and trace.nodes["x"]["scale"] == 5.0


@pytest.mark.parametrize("data_dim, n_latents, init", [(0, 3, "data"), (3, 0, "data"), (2.5, 3, "data"),
                                                      (3, 3, "pca")])
def test_constructor_rejects_bad_arguments(data_dim, n_latents, init):
    with pytest.raises(ValueError, match="data_dim|n_latents|init"):
        SparseCoding(data_dim, n_latents, init=init)


def test_named_models_keep_their_parameters_apart():
    x, _ = bars(30, side=3)
    first, second = SparseCoding(9, 6, name="first"), SparseCoding(9, 6, name="second")
    first(x)
    second(x[10:])
    names = set(pyro.get_param_store().keys())
    assert {"first.raw_dictionary", "second.raw_dictionary"} <= names
    assert not torch.equal(first.dictionary, second.dictionary)


def test_the_model_without_data_draws_from_itself():
    # model(None), as Pyro's models without data: z ~ Laplace(0, lambda), x ~ Normal(W z, sigma^2 I), site "x" sampled.
    # Checked against the closed-form covariance of x, W diag(2 lambda^2) W^T + sigma^2 I.
    model = SparseCoding(4, 3)
    with pytest.raises(ValueError, match="no dictionary yet"):
        model(None)
    torch.manual_seed(0)
    model.set_dictionary(torch.randn(4, 3, dtype=torch.float64))
    model.set_scales(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor(0.09, dtype=torch.float64))
    trace = poutine.trace(model).get_trace(None, subsample_size=200_000)
    assert not trace.nodes["x"]["is_observed"] and trace.nodes["z"]["value"].shape == (200_000, 3)
    x = trace.nodes["x"]["value"]
    dictionary = model.dictionary.detach()
    expected = dictionary @ torch.diag(2 * model.prior_scale.detach() ** 2) @ dictionary.T + 0.09 * torch.eye(4)
    assert torch.allclose(torch.cov(x.T), expected, rtol=0, atol=0.05 * float(expected.abs().max()))
    assert model(None).shape == (1, 3)
    assert pyro.infer.Predictive(model, num_samples=2)(None, subsample_size=5)["x"].shape == (2, 5, 4)
    with pytest.raises(ValueError, match="subsample_size"):
        model(None, subsample=torch.arange(3))


def test_pyros_model_inspection_traces_the_model():
    # pyro.render_model (through get_model_relations) failed on any Laplace site: torch's sampler builds its
    # uniforms with loc.new(shape), which Pyro's provenance-tracked tensors read as data. The codes' Laplace draws
    # the very same numbers another way.
    from pyro.infer.inspect import get_model_relations

    x = bars(20)[0]
    relations = get_model_relations(SparseCoding(25, 10), (x,))
    assert relations["sample_sample"] == {"z": [], "x": ["z"]} and relations["observed"] == ["x"]
    assert relations["sample_param"]["z"] == ["prior_scale"] and relations["plate_sample"]["data"] == ["z", "x"]
    assert relations["sample_dist"]["z"] == "Laplace"
