"""LocalMultivariateNormal, AmortizedNormal and a user's guide written from the README.

Every closed-form number is checked against an independent route: AnalyticELBO
against EntropyELBO (Theorem 2) and against Pyro's own Trace_ELBO / TraceMeanField_ELBO
(Monte Carlo, 4 standard errors), the fast protocol path against tracing the guide,
the packed Cholesky factor against a hand-written unpacking, the encoder against a
hand-written forward pass.
"""

import pytest
import torch
import torch.nn.functional as F

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

from helpers import (CORRELATED_GUIDES, FULL_COVARIANCE_GUIDES, PACKAGE_GUIDES, PROTOCOL_GUIDES,
                     assert_analytic_elbo_matches_trace_elbo, assert_same_posterior, guide_parameters, guide_problem,
                     monte_carlo_check)
from pyro_esc import (AmortizedNormal, AnalyticELBO, EntropyELBO, GaussianPosterior, LocalMultivariateNormal,
                      SparseCoding, encode, held_out_elbo, load, save, solve_posteriors)
from pyro_esc.data import bars
from pyro_esc.guides import inverse_softplus, scale_tril_from_packed
from pyro_esc.posterior import gaussian_posterior, posterior_from_trace

SIDE, N_LATENTS = 3, 6  # guide_problem's defaults: side 3, 2 * side latents


def relative_difference(a, b):
    return abs(a - b) / max(abs(a), abs(b))


def all_parameters(guide):
    return [value for _, value in guide_parameters(guide)] + [pyro.param("raw_dictionary").unconstrained()]


# ------------------------------------------------------------ the closed form on each guide


@pytest.mark.parametrize("guide_name", PACKAGE_GUIDES)
def test_entropy_elbo_equals_analytic_elbo_at_theorem2_scales(float64, guide_name):
    model, guide, x = guide_problem(guide_name)
    entropy_loss = EntropyELBO().loss(model, guide, x)
    EntropyELBO().update(model, guide, x)  # writes lambda*, sigma^2* into the model
    assert relative_difference(entropy_loss, AnalyticELBO().loss(model, guide, x)) < 1e-10


@pytest.mark.parametrize("guide_name", PACKAGE_GUIDES)
@pytest.mark.parametrize("scales", ["optimal", "arbitrary"])
def test_analytic_elbo_agrees_with_trace_elbo(float64, guide_name, scales):
    model, guide, x = guide_problem(guide_name)
    assert_analytic_elbo_matches_trace_elbo(model, guide, x, scales)


@pytest.mark.parametrize("guide_name", PACKAGE_GUIDES)
def test_gradients_of_entropy_and_analytic_elbo_agree_at_theorem2(float64, guide_name):
    model, guide, x = guide_problem(guide_name)
    EntropyELBO().update(model, guide, x)
    params = all_parameters(guide)
    entropy_grads = torch.autograd.grad(EntropyELBO().differentiable_loss(model, guide, x), params)
    analytic_grads = torch.autograd.grad(AnalyticELBO().differentiable_loss(model, guide, x), params)
    for entropy_grad, analytic_grad in zip(entropy_grads, analytic_grads):
        assert entropy_grad.abs().max() > 0
        assert torch.allclose(entropy_grad, analytic_grad, rtol=1e-8, atol=1e-10 * analytic_grad.abs().max())


@pytest.mark.parametrize("guide_name", CORRELATED_GUIDES)
def test_subsampled_analytic_elbo_agrees_with_trace_elbo(float64, guide_name):
    model, guide, x = guide_problem(guide_name, num=40)
    model.set_scales(prior_scale=torch.linspace(0.5, 1.5, N_LATENTS), noise_var=0.5)
    batch = torch.tensor([3, 17, 5, 28, 39, 0, 11, 22])
    analytic = AnalyticELBO().loss(model, guide, x, subsample=batch)
    trace_elbo, standard_error, _ = monte_carlo_check(model, guide, x, subsample=batch, num_particles=3000)
    assert abs(analytic - trace_elbo) < 4 * standard_error, (analytic, trace_elbo, standard_error)


@pytest.mark.parametrize("guide_name", FULL_COVARIANCE_GUIDES)
def test_trace_mean_field_elbo_agrees_with_analytic_elbo(float64, guide_name):
    # TraceMeanField_ELBO takes its own route (analytic KL where Pyro knows it, else Monte Carlo).
    model, guide, x = guide_problem(guide_name)
    EntropyELBO().update(model, guide, x)
    analytic = AnalyticELBO().loss(model, guide, x)
    # pyro_esc.kl makes the prior term analytic here, so the estimator's spread is its own:
    # measure it from independent repeats.
    elbo = TraceMeanField_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        values = torch.tensor([elbo.loss(model, guide, x) for _ in range(20)])
    standard_error = float(values.std() / 20 ** 0.5)
    assert abs(analytic - float(values.mean())) < 4 * standard_error, (analytic, values.mean(), standard_error)


# ------------------------------------------------------------ the protocol: fast path vs tracing


@pytest.mark.parametrize("guide_name", PROTOCOL_GUIDES)
@pytest.mark.parametrize("subsample", [None, torch.tensor([7, 2, 29, 2])], ids=["all", "batch"])
def test_fast_path_matches_automatic_recognition(float64, guide_name, subsample):
    model, guide, x = guide_problem(guide_name)
    dictionary = torch.randn(x.size(1), N_LATENTS)
    fast = gaussian_posterior(guide, x, subsample)
    assert_same_posterior(fast, posterior_from_trace(guide, x, subsample), dictionary)
    assert fast.num_points == (x.size(0) if subsample is None else subsample.numel())


def test_local_posterior_unpacks_the_parameters_by_hand(float64):
    model, guide, x = guide_problem("LocalMultivariateNormal")
    loc = pyro.param("LocalMultivariateNormal.locs.z").detach()
    diag = pyro.param("LocalMultivariateNormal.scale_diags.z").detach()
    off = pyro.param("LocalMultivariateNormal.scale_offdiags.z").detach()
    # N H (H + 3) / 2 numbers in all.
    assert loc.numel() + diag.numel() + off.numel() == x.size(0) * N_LATENTS * (N_LATENTS + 3) // 2
    expected = torch.zeros(x.size(0), N_LATENTS, N_LATENTS)
    for n in range(x.size(0)):
        k = 0
        for i in range(N_LATENTS):
            expected[n, i, i] = diag[n, i]
            for j in range(i):
                expected[n, i, j] = off[n, k + j]
            k += i
    posterior = guide.gaussian_posterior(x)
    covariance = expected @ expected.transpose(-1, -2)
    assert torch.allclose(posterior.mean, loc)
    assert torch.allclose(posterior.variance, covariance.diagonal(dim1=-2, dim2=-1))
    entropy = torch.distributions.MultivariateNormal(loc, covariance_matrix=covariance).entropy().sum()
    assert torch.allclose(posterior.entropy, entropy)
    assert (diag > 0).all()


def test_scale_tril_from_packed_matches_tril_indices_order():
    diagonal, off = torch.rand(2, 4) + 0.5, torch.randn(2, 6)
    tril = scale_tril_from_packed(diagonal, off)
    rows, columns = torch.tril_indices(4, 4, -1)
    assert torch.equal(tril[:, rows, columns], off)
    assert torch.equal(tril.diagonal(dim1=-2, dim2=-1), diagonal)
    assert torch.equal(tril.triu(1), torch.zeros_like(tril))
    with pytest.raises(ValueError, match="off_diagonal must have shape"):
        scale_tril_from_packed(diagonal, off[:, :5])


@pytest.mark.parametrize("guide_name", FULL_COVARIANCE_GUIDES + ("AmortizedNormal-lowrank",))
def test_guide_samples_have_the_summarised_moments(float64, guide_name):
    # A Monte Carlo route to the summary: Predictive draws from the guide (and the model).
    model, guide, x = guide_problem(guide_name, num=5)
    num_samples = 20000
    samples = Predictive(model, guide=guide, num_samples=num_samples, parallel=True)(x)
    z = samples["z"]
    assert z.shape == (num_samples, 5, N_LATENTS) and samples["x"].shape == (num_samples, 5, SIDE ** 2)
    posterior = guide.gaussian_posterior(x)
    standard_error = posterior.stddev / num_samples ** 0.5
    assert ((z.mean(0) - posterior.mean).abs() < 5 * standard_error).all()
    # Second moments, 5% is about 5 standard errors: the variances, and through a random W
    # the whole covariance (tr(W T W^T) involves every entry of T).
    centred = z - posterior.mean
    assert torch.allclose(centred.square().mean(0), posterior.variance, rtol=0.05)
    dictionary = torch.randn(SIDE ** 2, N_LATENTS)
    trace_terms = (centred @ dictionary.T).square().sum(-1).mean(0)
    assert torch.allclose(trace_terms, posterior.trace_terms(dictionary), rtol=0.05)
    # The correlations are really there: a diagonal summary would miss the trace terms by far.
    diagonal = posterior.variance @ dictionary.square().sum(0)
    assert ((diagonal - trace_terms).abs() / trace_terms).max() > 0.1


# ------------------------------------------------------------ training with SVI


@pytest.mark.parametrize("guide_name", PROTOCOL_GUIDES)
def test_one_svi_step_moves_every_guide_parameter(guide_name):
    model, guide, x = guide_problem(guide_name)
    elbo = EntropyELBO()
    elbo.loss(model, guide, x)  # the model initialises its parameters on its first evaluation
    with poutine.trace(param_only=True) as capture:  # what SVI hands to its optimiser
        elbo.loss_and_grads(model, guide, x)
    expected = {name for name, _ in guide_parameters(guide)} | {"raw_dictionary"}
    assert set(capture.trace.nodes) == expected
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    before = {name: value.detach().clone() for name, value in guide_parameters(guide)}
    svi.step(x)
    for name, value in guide_parameters(guide):
        assert not torch.equal(before[name], value.detach()), f"{name} did not move"


@pytest.mark.parametrize("loss", [Trace_ELBO(), TraceMeanField_ELBO()], ids=["Trace_ELBO", "TraceMeanField_ELBO"])
@pytest.mark.parametrize("guide_name", FULL_COVARIANCE_GUIDES)
def test_pyro_elbos_train_the_guides(guide_name, loss):
    model, guide, x = guide_problem(guide_name)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    svi.step(x)  # the model initialises its parameters on its first evaluation
    before = {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}
    assert torch.isfinite(torch.tensor(svi.step(x, subsample_size=10)))
    for name, value in pyro.get_param_store().named_parameters():
        assert not torch.equal(before[name], value.detach()), f"{name} did not move"


def test_local_guide_subsamples_through_the_models_plate(float64):
    model, guide, x = guide_problem("LocalMultivariateNormal", num=40)
    batch = torch.tensor([4, 9, 33])
    z = guide(x, subsample=batch)["z"]
    assert z.shape == (3, N_LATENTS)
    # Pyro's gradients (Trace_ELBO) reach only the batch's rows; the first Adam step moves only them.
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=Trace_ELBO())
    before = {name: value.detach().clone() for name, value in guide_parameters(guide)}
    svi.step(x, subsample=batch)
    others = torch.ones(40, dtype=torch.bool)
    others[batch] = False
    for name, value in guide_parameters(guide):
        moved = (value.detach() != before[name]).any(-1)
        assert moved[batch].all() and not moved[others].any(), name


def test_local_guide_set_up_on_a_minibatch_holds_every_point():
    x, _ = bars(40, side=SIDE)
    model = SparseCoding(x.size(1), N_LATENTS)
    guide = LocalMultivariateNormal(model, init_scale=0.2)
    guide(x, subsample_size=8)
    assert pyro.param("LocalMultivariateNormal.locs.z").shape == (40, N_LATENTS)
    # Initialisation: zero means (init_to_feasible), L = init_scale * I.
    assert torch.equal(pyro.param("LocalMultivariateNormal.locs.z"), torch.zeros(40, N_LATENTS))
    assert torch.allclose(pyro.param("LocalMultivariateNormal.scale_diags.z"), torch.full((40, N_LATENTS), 0.2))
    off_diagonal = pyro.param("LocalMultivariateNormal.scale_offdiags.z")
    assert torch.equal(off_diagonal, torch.zeros(40, N_LATENTS * (N_LATENTS - 1) // 2))
    assert torch.equal(guide.median(x)["z"], torch.zeros(40, N_LATENTS))


def test_local_guide_refuses_other_data_and_other_models():
    x, _ = bars(40, side=SIDE)
    model = SparseCoding(x.size(1), N_LATENTS)
    guide = LocalMultivariateNormal(model)
    guide(x)
    with pytest.raises(ValueError, match="40 data points, but x has 10"):
        EntropyELBO().loss(model, guide, x[:10])

    def positive_model(x, subsample=None):
        with pyro.plate("data", x.size(0), subsample=subsample):
            pyro.sample("rate", dist.Gamma(2.0, 1.0).expand([x.size(0), 3]).to_event(1))

    with pytest.raises(ValueError, match="site 'rate'"):
        LocalMultivariateNormal(positive_model)(x)


# ------------------------------------------------------------ the amortised guide


def test_amortized_encoder_is_the_documented_network(float64):
    model, guide, x = guide_problem("AmortizedNormal-full")
    params = dict(guide_parameters(guide))

    def linear(name, inputs):
        return inputs @ params[f"AmortizedNormal.{name}.weight"].T + params[f"AmortizedNormal.{name}.bias"]

    features = F.elu(linear("layers.0", x))  # the one hidden layer of helpers.GUIDES["AmortizedNormal-full"]
    assert guide.skip  # that guide has the skip connection
    # The skip connection x -> heads: one weight matrix, its rows split as the heads' outputs are.
    skip = dict(zip(("loc_layer", "scale_layer", "off_diagonal_layer"), (x @ params["AmortizedNormal.skip_layer.weight"].T).split(
        [N_LATENTS, N_LATENTS, N_LATENTS * (N_LATENTS - 1) // 2], dim=-1)))

    def head(name):
        return linear(name, features) + skip[name]

    loc, scale_tril = guide.encode(x)
    assert torch.allclose(loc, head("loc_layer"))
    assert torch.allclose(scale_tril.diagonal(dim1=-2, dim2=-1), F.softplus(head("scale_layer")))
    rows, columns = torch.tril_indices(N_LATENTS, N_LATENTS, -1)
    assert torch.allclose(scale_tril[:, rows, columns], head("off_diagonal_layer"))


def test_amortized_lowrank_residual_encoder_is_the_documented_network(float64):
    # helpers.GUIDES["AmortizedNormal-lowrank"]: hidden (8, 7), ReLU6, rank 2, the skip connection;
    # "-residual": two residual blocks of width D = 9 (inner 14), tanh, full covariance, no skip connection.
    model, guide, x = guide_problem("AmortizedNormal-lowrank")
    params = dict(guide_parameters(guide))

    def linear(name, inputs):
        return inputs @ params[f"AmortizedNormal.{name}.weight"].T + params[f"AmortizedNormal.{name}.bias"]

    features = F.relu6(linear("layers.1", F.relu6(linear("layers.0", x))))
    skip_loc, skip_scale, skip_factor = (x @ params["AmortizedNormal.skip_layer.weight"].T).split(
        [N_LATENTS, N_LATENTS, 2 * N_LATENTS], dim=-1)
    loc, (factor, cov_diag) = guide.encode(x)
    assert torch.allclose(loc, linear("loc_layer", features) + skip_loc)
    assert torch.allclose(cov_diag, (F.softplus(linear("scale_layer", features) + skip_scale) + 1e-3).square())
    assert torch.allclose(factor, (linear("off_diagonal_layer", features) + skip_factor).reshape(-1, N_LATENTS, 2))

    pyro.clear_param_store()
    model, guide, x = guide_problem("AmortizedNormal-residual")
    params = dict(guide_parameters(guide))
    features = x
    for block in range(2):
        inner = torch.tanh(linear(f"residual_blocks.{block}.inner", features))
        assert inner.size(-1) == 14  # 3/2 of the width
        features = features + linear(f"residual_blocks.{block}.outer", inner)
    loc, scale_tril = guide.encode(x)  # no skip connection (the default)
    assert "AmortizedNormal.skip_layer.weight" not in params and not guide.skip
    assert torch.allclose(loc, linear("loc_layer", features))
    assert torch.allclose(scale_tril.diagonal(dim1=-2, dim2=-1), F.softplus(linear("scale_layer", features)))


@pytest.mark.parametrize("covariance", ["diag", "full", "lowrank"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "no-skip"])
def test_match_posteriors_sets_the_heads_to_their_least_squares_optimum(float64, covariance, skip):
    # Targets: per-point optima solved at a random model. The heads' raw outputs are linear in their
    # weights, so at the least-squares optimum the squared error's gradient in every head weight is 0,
    # checked by autograd, independently of the solve; the trunk is untouched.
    torch.manual_seed(0)
    model = SparseCoding(SIDE ** 2, N_LATENTS)
    model.set_dictionary(torch.randn(SIDE ** 2, N_LATENTS))
    x = model.sample(300)[1]
    posterior = solve_posteriors(model, x, "diag" if covariance == "diag" else "full").posterior
    guide = AmortizedNormal(SIDE ** 2, N_LATENTS, hidden=(12,), covariance=covariance, skip=skip)
    trunk = [layer.weight.detach().clone() for layer in guide.layers]
    errors = guide.match_posteriors(x, posterior, ridge=0.0)
    assert all(torch.equal(layer.weight, weight) for layer, weight in zip(guide.layers, trunk))
    # The targets, each head's output before its transform.
    if covariance == "full":
        scale_tril = torch.linalg.cholesky(posterior.covariance_matrices())
        rows, columns = torch.tril_indices(N_LATENTS, N_LATENTS, -1)
        targets = [posterior.mean, inverse_softplus(scale_tril.diagonal(dim1=-2, dim2=-1)),
                   scale_tril[:, rows, columns]]
    else:
        minimum = 1e-3 if covariance == "lowrank" else 0.0
        targets = [posterior.mean, inverse_softplus(posterior.stddev - minimum), None]
    outputs = guide._raw_outputs(x)
    fitted = [index for index, target in enumerate(targets) if target is not None]
    squared_error = sum((outputs[index] - targets[index]).square().sum() for index in fitted)
    heads = guide._heads()
    weights = [weight for index in fitted for weight in (heads[index].weight, heads[index].bias)]
    if skip:  # the skip connection's rows of the fitted heads (they come first)
        weights.append(guide.skip_layer.weight)
    gradients = torch.autograd.grad(squared_error, weights)
    if skip:
        gradients = gradients[:-1] + (gradients[-1][:sum(guide._head_sizes()[index] for index in fitted)],)
    for weight, gradient in zip(weights, gradients):
        assert gradient.abs().max() < 1e-8 * x.size(0) * (1 + float(squared_error.detach())), weight.shape
    assert errors[0] == pytest.approx(float((outputs[0] - targets[0]).square().mean()), rel=1e-6)
    assert (errors[2] is None) == (covariance != "full")


def test_match_posteriors_refuses_what_it_cannot_fit():
    guide = AmortizedNormal(SIDE ** 2, N_LATENTS, hidden=(12,), skip=True)
    model = SparseCoding(SIDE ** 2, N_LATENTS)
    model.set_dictionary(torch.randn(SIDE ** 2, N_LATENTS))
    x = model.sample(30)[1]
    posterior = solve_posteriors(model, x).posterior
    with pytest.raises(ValueError, match="at least 22 points"):  # 12 features + 9 skip inputs + 1 bias
        guide.match_posteriors(x[:20], posterior.index_select(torch.arange(20)))
    with pytest.raises(ValueError, match="posterior must be a per-point GaussianPosterior of 30 points"):
        guide.match_posteriors(x, posterior.index_select(torch.arange(20)))
    with pytest.raises(ValueError, match="ridge must be a number >= 0"):
        guide.match_posteriors(x, posterior, ridge=-1.0)


class _DenseReference:
    """A guide whose summary is the dense covariance F F^T + diag(d), built explicitly from the
    low-rank guide's outputs and factorised by Cholesky: an independent route to every term."""

    def __init__(self, guide):
        self.guide = guide

    def gaussian_posterior(self, x, subsample=None):
        loc, (factor, cov_diag) = self.guide.encode(x if subsample is None else x[subsample])
        dense = torch.einsum("bik,bjk->bij", factor, factor) + torch.diag_embed(cov_diag)
        return GaussianPosterior.from_covariance(loc, dense)


@pytest.mark.parametrize("subsample", [None, torch.tensor([7, 2, 29, 5])], ids=["all", "batch"])
def test_amortized_lowrank_head_matches_a_dense_covariance(float64, subsample):
    model, guide, x = guide_problem("AmortizedNormal-lowrank")
    model.set_scales(prior_scale=torch.linspace(0.5, 1.5, N_LATENTS), noise_var=0.5)
    reference = _DenseReference(guide)
    posterior = gaussian_posterior(guide, x, subsample)
    dense = reference.gaussian_posterior(x, subsample)
    assert posterior.family == "low-rank"
    dictionary = torch.randn(x.size(1), N_LATENTS)
    # Entropy (determinant lemma vs Cholesky of the H x H matrix), trace term, marginal variances.
    assert torch.allclose(posterior.point_entropies(), dense.point_entropies(), rtol=1e-10)
    assert torch.allclose(posterior.trace_terms(dictionary), dense.trace_terms(dictionary), rtol=1e-10)
    assert torch.allclose(posterior.variance, dense.variance, rtol=1e-10)
    # Both closed-form objectives, values and gradients with respect to every parameter.
    kwargs = {} if subsample is None else {"subsample": subsample}
    for loss in (AnalyticELBO(), EntropyELBO()):
        value = loss.differentiable_loss(model, guide, x, **kwargs)
        expected = loss.differentiable_loss(model, reference, x, **kwargs)
        params = all_parameters(guide)
        grads = torch.autograd.grad(value, params)
        expected_grads = torch.autograd.grad(expected, params)
        assert torch.allclose(value, expected, rtol=1e-10)
        for grad, expected_grad in zip(grads, expected_grads):
            assert torch.allclose(grad, expected_grad, rtol=1e-8, atol=1e-10 * expected_grad.abs().max())


@pytest.mark.parametrize("guide_name", ["AmortizedNormal-lowrank", "AmortizedNormal-residual"])
def test_new_encoders_save_load_and_encode(tmp_path, float64, guide_name):
    model, guide, x = guide_problem(guide_name)
    EntropyELBO().update(model, guide, x)
    path = tmp_path / "model.pt"
    save(path, model, guide)
    expected = gaussian_posterior(guide, x).detach()
    held_out, _ = bars(12, side=SIDE, seed=11, dtype=torch.float64)
    expected_held_out = held_out_elbo(model, guide, held_out)
    with pyro.get_param_store().scope():
        pyro.clear_param_store()
        loaded = load(path)
        assert loaded.guide.config() == guide.config()
        got = gaussian_posterior(loaded.guide, x)
        assert type(got) is type(expected)
        for a, b in zip(got._arguments(), expected._arguments()):
            assert torch.equal(a.detach(), b)
        # encode runs the encoder; the held-out ELBO works on its result.
        encoded = encode(loaded.model, loaded.guide, held_out)
        assert encoded.family == ("low-rank" if guide_name.endswith("lowrank") else "full")
        assert held_out_elbo(loaded.model, encoded, held_out) == pytest.approx(expected_held_out, rel=1e-12)


def test_amortized_guide_with_an_unnamed_activation_is_not_saved(tmp_path):
    class Cube(torch.nn.Module):
        def forward(self, x):
            return x ** 3

    guide = AmortizedNormal(SIDE ** 2, N_LATENTS, hidden=(4,), activation=Cube)
    assert guide.activation_name is None
    x, _ = bars(10, side=SIDE)
    assert guide.encode(x)[0].shape == (10, N_LATENTS)
    with pytest.raises(ValueError, match="Cube"):
        save(tmp_path / "model.pt", SparseCoding(SIDE ** 2, N_LATENTS), guide)


@pytest.mark.parametrize("covariance", ["diag", "lowrank", "full"])
@pytest.mark.parametrize("options", [{}, dict(blocks=2, activation="relu6"), dict(activation="tanh", blocks=1)],
                         ids=["mlp", "residual-relu6", "residual-tanh"])
def test_amortized_initialisation_starts_near_zero_means_and_init_scale(covariance, options):
    x, _ = bars(200, side=SIDE)
    options = dict(dict(hidden=(32, 32)), **options)
    guide = AmortizedNormal(SIDE ** 2, N_LATENTS, covariance=covariance, init_scale=0.3, **options)
    loc, scale = guide.encode(x)
    # Means near 0 and scales near init_scale for every point, whatever its size (|x| up to ~10).
    assert loc.abs().max() < 0.05
    posterior = guide.gaussian_posterior(x)
    covariances = posterior.covariance_matrices()
    off_diagonal = covariances - torch.diag_embed(covariances.diagonal(dim1=-2, dim2=-1))
    assert off_diagonal.abs().max() < 0.1 * 0.3 ** 2
    assert torch.allclose(posterior.stddev, torch.full_like(posterior.stddev, 0.3), rtol=0.05)
    if covariance == "lowrank":
        factor, _ = scale
        # Small, but not 0: F = 0 is a stationary point of the ELBO in F.
        assert 0 < factor.abs().max() < 0.05


def test_amortized_guide_encodes_held_out_data_and_minibatches(float64):
    model, guide, x = guide_problem("AmortizedNormal-full")
    held_out, _ = bars(12, side=SIDE, seed=11, dtype=torch.float64)
    # Held-out data of another size, at the scales trained on x (never re-fitted to the held-out
    # data): the closed form still agrees with Pyro's Monte Carlo.
    EntropyELBO().update(model, guide, x)
    analytic = AnalyticELBO().loss(model, guide, held_out)
    trace_elbo, standard_error, _ = monte_carlo_check(model, guide, held_out, num_particles=3000)
    assert abs(analytic - trace_elbo) < 4 * standard_error
    # A point's posterior does not depend on which batch it is encoded in.
    loc, scale_tril = guide.encode(held_out)
    batch = torch.tensor([5, 0, 9])
    posterior = guide.gaussian_posterior(held_out, batch)
    assert torch.allclose(posterior.mean, loc[batch])
    assert torch.allclose(posterior.variance, scale_tril[batch].square().sum(-1))
    z = guide(held_out, subsample=batch)
    assert z.shape == (3, N_LATENTS)


def test_amortized_guide_follows_the_data_dtype():
    guide = AmortizedNormal(SIDE ** 2, N_LATENTS, hidden=(4,))
    x, _ = bars(10, side=SIDE, dtype=torch.float64)
    loc, scale = guide.encode(x)
    assert loc.dtype == scale.dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        guide.encode(x.float())


@pytest.mark.parametrize("kwargs, message", [
    (dict(covariance="low-rank"), "covariance"),
    (dict(covariance="diag", rank=2), "rank applies"),
    (dict(covariance="lowrank", rank=0), "rank"),
    (dict(activation="sigmoidish"), "activation"),
    (dict(activation=torch.relu), "activation"),
    (dict(blocks=-1), "blocks"),
    (dict(block_width=4), "block_width applies"),
    (dict(blocks=1, block_width=0), "block_width"),
    (dict(min_scale=0.1), "min_scale"),
    (dict(min_scale=-1e-3), "min_scale"),
    (dict(hidden=(8, 0)), "hidden"),
    (dict(hidden=8), "hidden"),
    (dict(init_scale=0.0), "init_scale"),
    (dict(out_init=-1.0), "out_init"),
])
def test_amortized_guide_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AmortizedNormal(SIDE ** 2, N_LATENTS, **kwargs)


def test_guides_validate_their_inputs():
    x, _ = bars(10, side=SIDE)
    guide = AmortizedNormal(SIDE ** 2, N_LATENTS, hidden=(4,))
    with pytest.raises(ValueError, match="x has data dimension 4"):
        guide.encode(x[:, :4])
    with pytest.raises(ValueError, match="subsample"):
        guide(x, subsample=torch.tensor([10]))
    with pytest.raises(ValueError, match="init_scale"):
        LocalMultivariateNormal(SparseCoding(9, N_LATENTS), init_scale=-0.1)


# ------------------------------------------------------------ the guide registry


def test_the_registry_builds_each_guide_and_names_it_back():
    from pyro_esc.variational.registry import GUIDES, guide_name, make_guide

    for name in GUIDES:
        pyro.clear_param_store()
        model = SparseCoding(9, 4)
        options = {"hidden": (5,)} if GUIDES[name].amortized else {}
        assert guide_name(make_guide(name, model, **options)) == name
    with pytest.raises(ValueError, match="one of"):
        make_guide("local-lowrank", SparseCoding(9, 4))
    with pytest.raises(ValueError, match="encoder"):
        make_guide("local-full", SparseCoding(9, 4), hidden=(5,))


def test_the_command_line_the_experiments_and_the_estimator_use_the_registry():
    from pyro_esc import experiments
    from pyro_esc.cli import build_parser
    from pyro_esc.sklearn import GUIDES as ESTIMATOR_GUIDES
    from pyro_esc.variational.registry import GUIDES

    assert experiments.GUIDES == tuple(GUIDES)
    choices = next(action.choices for action in build_parser()._subparsers._group_actions[0].choices["bars"]._actions
                   if action.dest == "guide")
    assert tuple(choices) == tuple(GUIDES)
    assert {"amortized-diag" if name == "amortized" else name for name in ESTIMATOR_GUIDES} <= set(GUIDES)
