"""Closed-form KL(Gaussian || Laplace) (pyro_esc.kl) against Monte Carlo, torch, and inside TraceMeanField_ELBO."""

import math

import pytest
import torch
import torch.distributions as tdist
from torch.distributions import kl_divergence
from torch.distributions.kl import _dispatch_kl

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from helpers import fit_guide_only, fixed_gaussian_guide, monte_carlo_check, per_particle_losses, randomize_guide
from pyro_esc import AnalyticELBO, SparseCoding
from pyro_esc.data import bars
from pyro_esc.kl import kl_low_rank_independent_laplace, kl_mvn_independent_laplace, kl_normal_laplace


def monte_carlo_kl(q, p, num_samples=200_000):
    """E_q[log q(z) - log p(z)] and its standard error, elementwise over the batch."""
    z = q.sample((num_samples,))
    values = q.log_prob(z) - p.log_prob(z)
    return values.mean(0), values.std(0) / num_samples ** 0.5


def test_normal_laplace_matches_monte_carlo_and_broadcasts(float64):
    generator = torch.Generator().manual_seed(0)
    q = dist.Normal(torch.randn(3, 4, generator=generator), torch.rand(3, 4, generator=generator) + 0.1)
    p = dist.Laplace(torch.randn(4, generator=generator), torch.rand(4, generator=generator) + 0.3)
    value = kl_divergence(q, p)
    assert value.shape == (3, 4)
    estimate, error = monte_carlo_kl(q, p)
    assert bool(((value - estimate).abs() < 4 * error).all())
    # A second closed form: torch's own rule (pytorch/pytorch#68807), written differently.
    assert torch.allclose(value, torch.distributions.kl._kl_normal_laplace(q, p), atol=1e-12)
    # Near a point mass at m: KL = -1/2 log(2 pi e s^2) + log(2 b) + s sqrt(2 / pi) / b.
    s, b = 1e-8, 2.0
    tiny = kl_normal_laplace(tdist.Normal(torch.tensor(0.5), torch.tensor(s)), tdist.Laplace(0.5, b))
    expected = -0.5 * math.log(2 * math.pi * math.e * s ** 2) + math.log(2 * b) + s * math.sqrt(2 / math.pi) / b
    assert float(tiny) == pytest.approx(expected, rel=1e-12)


def test_pyro_classes_dispatch_here_and_torch_classes_keep_torchs_rule():
    assert _dispatch_kl(dist.Normal, dist.Laplace) is kl_normal_laplace
    assert _dispatch_kl(tdist.Normal, tdist.Laplace) is torch.distributions.kl._kl_normal_laplace
    assert _dispatch_kl(dist.MultivariateNormal, dist.Independent) is kl_mvn_independent_laplace
    assert _dispatch_kl(dist.LowRankMultivariateNormal, dist.Independent) is kl_low_rank_independent_laplace


def test_gradients_stay_finite_for_tiny_scales():
    # float32 with scale 1e-20: torch's formula overflows (loc / scale)^2 and its gradient is NaN.
    loc = torch.tensor([1.0, 0.0, -2.0], requires_grad=True)
    scale = torch.tensor([1e-20, 1e-20, 0.5], requires_grad=True)
    prior = dist.Laplace(torch.zeros(3), torch.ones(3))
    kl_divergence(dist.Normal(loc, scale), prior).sum().backward()
    assert bool(torch.isfinite(loc.grad).all()) and bool(torch.isfinite(scale.grad).all())
    # d KL / d loc = erf(loc / (sqrt 2 scale)) / b -> sign(loc) as scale -> 0.
    assert loc.grad.tolist()[:2] == [1.0, 0.0]


@pytest.mark.parametrize("kind", ["full", "low-rank"])
def test_correlated_gaussian_against_independent_laplace(float64, kind):
    generator = torch.Generator().manual_seed(1)
    loc = torch.randn(2, 3, generator=generator)
    if kind == "full":
        tril = torch.randn(2, 3, 3, generator=generator).tril() * 0.4 + 0.5 * torch.eye(3)
        q = dist.MultivariateNormal(loc, scale_tril=tril)
    else:
        q = dist.LowRankMultivariateNormal(loc, 0.5 * torch.randn(2, 3, 2, generator=generator),
                                           torch.rand(2, 3, generator=generator) + 0.1)
    p = dist.Laplace(torch.randn(3, generator=generator), torch.rand(3, generator=generator) + 0.3).to_event(1)
    value = kl_divergence(q, p)
    assert value.shape == (2,)
    estimate, error = monte_carlo_kl(q, p)
    assert bool(((value - estimate).abs() < 4 * error).all())


def test_other_independent_bases_still_raise_not_implemented(float64):
    q = dist.MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(NotImplementedError):
        kl_divergence(q, dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pytest.raises(NotImplementedError):
        kl_divergence(q, dist.Laplace(torch.zeros(2, 3), 1.0).to_event(2))
    with pytest.raises(ValueError, match="q must be a Normal"):
        kl_normal_laplace(dist.Laplace(0.0, 1.0), dist.Laplace(0.0, 1.0))


# ------------------------------------------------------------ inside TraceMeanField_ELBO


def fixed_guide_problem(kind, num=20):
    """Bars with the model at the truth and a fixed per-point Gaussian guide ("normal" or "mvn"),
    not one of helpers.GUIDES."""
    x, dictionary = bars(num, side=3, seed=3, dtype=torch.float64)
    model = SparseCoding(x.size(1), dictionary.size(1))
    model.set_dictionary(dictionary)
    model.set_scales(prior_scale=3 ** 0.5, noise_var=0.09)
    generator = torch.Generator().manual_seed(2)
    loc = 0.5 * torch.randn(num, dictionary.size(1), generator=generator)
    if kind == "normal":
        guide = fixed_gaussian_guide(loc, scale=torch.rand(num, dictionary.size(1), generator=generator) * 0.3 + 0.1)
    else:
        tril = 0.2 * torch.eye(dictionary.size(1)) + 0.05 * torch.randn(num, 6, 6, generator=generator).tril(-1)
        guide = fixed_gaussian_guide(loc, scale_tril=tril)
    guide(x)
    return model, guide, x


@pytest.mark.parametrize("kind", ["normal", "mvn"])
def test_trace_mean_field_integrates_the_prior_term_exactly(float64, kind):
    # With the observation hidden the loss is sum_n KL(q_n || p): no sample enters it.
    model, guide, x = fixed_guide_problem(kind)
    prior_only = poutine.block(model, hide=["x"])
    elbo = TraceMeanField_ELBO()
    values = []
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        values.append(elbo.loss(prior_only, guide, x))
    assert values[0] == values[1]
    # Independent route: Trace_ELBO's Monte Carlo estimate of the same sum of KLs.
    estimate, error, _ = monte_carlo_check(prior_only, guide, x, num_particles=4000)
    assert abs(values[0] - estimate) < 4 * error


@pytest.mark.parametrize("kind", ["normal", "mvn"])
def test_trace_mean_field_samples_only_the_likelihood_term(float64, kind):
    # Per particle: loss = -log p(x | z) + sum_n KL(q_n || p), with z the guide's draw.
    model, guide, x = fixed_guide_problem(kind)
    kl_sum = TraceMeanField_ELBO().loss(poutine.block(model, hide=["x"]), guide, x)
    pyro.set_rng_seed(7)
    loss = TraceMeanField_ELBO().loss(model, guide, x)
    pyro.set_rng_seed(7)
    trace = poutine.trace(guide).get_trace(x)
    z = trace.nodes["z"]["value"]
    log_likelihood = dist.Normal(z @ model.dictionary.T, model.noise_var.sqrt()).log_prob(x).sum()
    assert loss == pytest.approx(float(kl_sum - log_likelihood.detach()), rel=1e-12)
    # Unbiased: the average over particles is the closed-form ELBO.
    mean_field = TraceMeanField_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    errors = likelihood_term_errors(model, guide, x)
    assert abs(mean_field.loss(model, guide, x) - AnalyticELBO().loss(model, guide, x)) < 4 * float(errors.std()) / 2000 ** 0.5


def likelihood_term_errors(model, guide, x, num_particles=2000):
    """-log p(x | z_k) per particle (the only sampled part of TraceMeanField_ELBO's loss)."""
    with torch.no_grad(), pyro.plate("particles", num_particles, dim=-2):
        z = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    return -dist.Normal(z @ model.dictionary.detach().T, model.noise_var.detach().sqrt()).log_prob(x).sum((-2, -1))


def test_autonormal_gets_no_analytic_term(float64):
    # AutoNormal's "z" is a Delta at its auxiliary Normal's value: KL(Delta || p) = -log p(z) is
    # sampled, so TraceMeanField_ELBO computes exactly what Trace_ELBO computes.
    x, _ = bars(20, side=3, seed=3, dtype=torch.float64)
    model = SparseCoding(x.size(1), 6)
    guide = AutoNormal(model)
    randomize_guide(guide, x)
    pyro.set_rng_seed(3)
    trace_elbo = Trace_ELBO().loss(model, guide, x)
    pyro.set_rng_seed(3)
    assert TraceMeanField_ELBO().loss(model, guide, x) == pytest.approx(trace_elbo, rel=1e-13)


def test_variance_against_trace_elbo(float64):
    # Analytic KL removes the noise of the prior and entropy terms, but also their cancellation
    # with the likelihood term (log p(x, z) - log q(z) is constant when q is the posterior).
    # Which estimator is less noisy therefore depends on the guide:
    model, guide, x = fixed_guide_problem("normal", num=8)
    # a guide far from the posterior, under a weak likelihood: the analytic KL wins clearly;
    model.set_scales(noise_var=10.0)
    assert float(likelihood_term_errors(model, guide, x).std()) < 0.3 * float(per_particle_losses(model, guide, x).std())
    # a fitted guide under the bars' likelihood: Trace_ELBO is less noisy.
    model.set_scales(noise_var=0.09)
    fit_guide_only(model, guide, x, steps=150, lr=0.1)
    assert float(per_particle_losses(model, guide, x).std()) < 0.7 * float(likelihood_term_errors(model, guide, x).std())
