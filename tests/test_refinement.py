"""SemiAmortized: encoder posteriors refined per point with the model fixed.

Independent routes: the refined posteriors after many steps against encode()'s per-point
optimum (L-BFGS on a LocalMultivariateNormal); point_elbos against AnalyticELBO; the
dictionary's gradient against finite differences of the ELBO at the refined posteriors held
fixed; the encoder's gradient against the gradient of its own AnalyticELBO.
"""

import pytest
import torch

import pyro

from helpers import guide_parameters
from pyro_esc import (AmortizedNormal, AnalyticELBO, EntropyELBO, GaussianPosterior, LocalMultivariateNormal,
                      SparseCoding, encode, fit, held_out_elbo)
from pyro_esc.data import bars
from pyro_esc.refinement import SemiAmortized, point_elbos

SIDE, N_LATENTS = 3, 6


def problem(covariance, num=40, seed=3, rank=3):
    """Bars, a model near the true dictionary with fixed scales, and a small random encoder."""
    x, true_dictionary = bars(num, side=SIDE, seed=seed, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    model = SparseCoding(x.size(1), N_LATENTS)
    model.set_dictionary(true_dictionary + 0.1 * torch.randn(true_dictionary.shape, generator=generator,
                                                              dtype=torch.float64))
    model.set_scales(torch.linspace(1.0, 2.0, N_LATENTS, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    extra = {"rank": rank} if covariance == "lowrank" else {}
    encoder = AmortizedNormal(x.size(1), N_LATENTS, hidden=(8,), covariance=covariance, **extra)
    return model, encoder, x


class FixedPosterior:
    """A guide that returns one fixed Gaussian summary."""

    def __init__(self, posterior):
        self.posterior = posterior

    def gaussian_posterior(self, x, subsample=None):
        return self.posterior if subsample is None else self.posterior.index_select(subsample)


@pytest.mark.parametrize("covariance", ["diag", "lowrank", "full"])
def test_point_elbos_sum_to_the_analytic_elbo(float64, covariance):
    model, encoder, x = problem(covariance)
    posterior = encoder.gaussian_posterior(x)
    values = point_elbos(posterior, x, model.dictionary, model.prior_scale, model.noise_var)
    assert values.shape == (x.size(0),)
    assert float(values.sum().detach()) == pytest.approx(-AnalyticELBO().loss(model, encoder, x), rel=1e-12)


@pytest.mark.parametrize("covariance", ["lowrank", "full"])
def test_many_refinement_steps_reach_the_per_point_optimum(float64, covariance):
    # Low rank R = H: the family holds every covariance, so the optimum is the per-point full one.
    model, encoder, x = problem(covariance, num=12, rank=N_LATENTS)
    # The per-point optimum at the fixed model, by an independent route (fit's L-BFGS on per-point Gaussians).
    optimum = encode(model, LocalMultivariateNormal(model), x)
    refined = SemiAmortized(encoder, model, steps=300, method="lbfgs").posterior(x)
    encoder_gap = held_out_elbo(model, optimum, x) - held_out_elbo(model, encoder, x)
    refined_gap = held_out_elbo(model, optimum, x) - held_out_elbo(model, refined, x)
    assert encoder_gap > 0.5  # a random encoder is far from the optimum ...
    assert abs(refined_gap) < 1e-6  # ... refinement reaches it
    assert torch.allclose(refined.mean, optimum.mean, atol=1e-4)
    assert torch.allclose(refined.covariance_matrices(), optimum.covariance_matrices(), atol=1e-4)
    # Adam's elementwise steps get most of the way in 300 steps.
    adam = SemiAmortized(encoder, model, steps=300, lr=0.2, final_lr=1e-4).posterior(x)
    assert held_out_elbo(model, optimum, x) - held_out_elbo(model, adam, x) < 0.1 * encoder_gap


@pytest.mark.parametrize("covariance", ["diag", "lowrank", "full"])
def test_refinement_improves_each_point_and_ignores_the_batch(float64, covariance):
    model, encoder, x = problem(covariance)
    fixed = (model.dictionary, model.prior_scale, model.noise_var)
    before = point_elbos(encoder.gaussian_posterior(x), x, *fixed)
    guide = SemiAmortized(encoder, model, steps=30)
    after = point_elbos(guide.posterior(x), x, *fixed)
    assert (after > before).all()
    # A point's refined posterior does not depend on the other points of its batch.
    batch = torch.tensor([5, 0, 17])
    alone = guide.gaussian_posterior(x, batch).detach()
    together = guide.posterior(x).index_select(batch)
    assert torch.allclose(alone.mean, together.mean, rtol=1e-10)
    assert torch.allclose(alone.covariance_matrices(), together.covariance_matrices(), rtol=1e-10)
    # encode() of a SemiAmortized guide is the refined posterior; with 0 steps the guide is the encoder.
    assert torch.allclose(encode(model, guide, x).mean, guide.posterior(x).mean)
    assert held_out_elbo(model, SemiAmortized(encoder, model, steps=0), x) == held_out_elbo(model, encoder, x)


@pytest.mark.parametrize("loss", [AnalyticELBO(), EntropyELBO()], ids=["AnalyticELBO", "EntropyELBO"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_gradients_train_the_dictionary_at_the_refined_posterior_and_the_encoder_by_its_own_elbo(
        float64, covariance, loss):
    model, encoder, x = problem(covariance)
    guide = SemiAmortized(encoder, model, steps=20)
    if isinstance(loss, EntropyELBO):
        loss.update(model, guide, x)  # lambda*, sigma^2* into the model, as fit does
    refined = guide.posterior(x)
    value = loss.differentiable_loss(model, guide, x)
    # The value is the ELBO of the refined posteriors.
    assert float(value) == pytest.approx(loss.loss(model, FixedPosterior(refined), x), rel=1e-12)
    encoder_params = [param for _, param in guide_parameters(encoder)]
    raw = pyro.param("raw_dictionary").unconstrained()
    grads = torch.autograd.grad(value, [raw] + encoder_params)
    # Dictionary: the gradient of the ELBO at the refined posteriors held fixed, by central differences.
    fixed = FixedPosterior(refined)
    step, numerical = 1e-6, torch.zeros_like(raw)
    with torch.no_grad():
        for index in [(0, 0), (4, 2), (8, 5), (3, 1)]:
            original = raw[index].item()
            values = []
            for sign in (1, -1):
                raw[index] = original + sign * step
                values.append(loss.loss(model, fixed, x))
            raw[index] = original
            numerical[index] = (values[0] - values[1]) / (2 * step)
            assert grads[0][index].item() == pytest.approx(numerical[index].item(), rel=1e-5, abs=1e-6)
    # Encoder: the gradient of its own ELBO at the model's lambda, sigma^2 (AnalyticELBO of the encoder alone).
    own = torch.autograd.grad(AnalyticELBO().differentiable_loss(model, encoder, x), encoder_params)
    for grad, expected in zip(grads[1:], own):
        assert grad.abs().max() > 0
        assert torch.allclose(grad, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())


def test_fit_trains_a_semi_amortized_guide_by_svi_and_refuses_lbfgs():
    x, _ = bars(200, side=SIDE, seed=0)
    model = SparseCoding(x.size(1), N_LATENTS)
    encoder = AmortizedNormal(x.size(1), N_LATENTS, hidden=(16,), covariance="full")
    guide = SemiAmortized(encoder, model, steps=5)
    with pytest.raises(ValueError, match="lbfgs"):
        fit(model, guide, x, optimizer="lbfgs", steps=2, progress=False)
    before = {name: value.detach().clone() for name, value in encoder.named_parameters()}
    history = fit(model, guide, x, steps=30, lr=0.01, progress=False)
    assert history.route == "svi"
    after = dict(encoder.named_parameters())
    assert set(after) == set(before) and len(after) == 8  # 4 layers
    for name, value in after.items():
        assert not torch.equal(before[name], value.detach()), f"{name} did not move"
    # The refined ELBO is at least the encoder's at the trained model.
    assert held_out_elbo(model, guide, x) > held_out_elbo(model, encoder, x)


def test_semi_amortized_validates_its_arguments():
    model = SparseCoding(9, N_LATENTS)
    encoder = AmortizedNormal(9, N_LATENTS)
    with pytest.raises(ValueError, match="encoder"):
        SemiAmortized(LocalMultivariateNormal(model), model)
    with pytest.raises(ValueError, match="steps"):
        SemiAmortized(encoder, model, steps=-1)
    with pytest.raises(ValueError, match="lr"):
        SemiAmortized(encoder, model, lr=0.0)
    assert isinstance(SemiAmortized(encoder, model).posterior(bars(5, side=SIDE)[0]), GaussianPosterior)
