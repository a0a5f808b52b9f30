"""Entropy annealing: schedules, and EntropyELBO's weighted objective (docs/theory.md, Annealing)."""

import math

import pytest
import torch

import pyro
from pyro.infer import SVI

from helpers import guide_problem
from pyro_esc import EntropyELBO
from pyro_esc.annealing import Annealing, Schedule, constant, exponential, linear, step


@pytest.mark.parametrize("schedule, at_zero, at_half", [
    (constant(3.0), 3.0, 3.0),
    (linear(3.0), 3.0, 2.0),
    (exponential(4.0), 4.0, 2.0),
    (step(0.5, at=0.6), 0.5, 0.5),
    (Schedule(lambda t: 1 + (1 - t) ** 2), 2.0, 1.25),
])
def test_schedules_start_where_asked_and_end_at_one(schedule, at_zero, at_half):
    assert math.isclose(schedule(0.0), at_zero)
    assert math.isclose(schedule(0.5), at_half)
    assert schedule(1.0) == 1.0 and schedule(7.0) == 1.0  # after the annealing period


@pytest.mark.parametrize("make, message", [
    (lambda: Schedule(lambda t: 2.0), "must end at 1"),
    (lambda: Schedule("linear"), "callable"),
    (lambda: linear(-1.0), "start"),
    (lambda: exponential(0.0), "start > 0"),
    (lambda: step(2.0, at=1.5), "at must be"),
    (lambda: Annealing(0), "num_steps"),
    (lambda: Annealing(10, posterior=2.0), "posterior must be"),
    (lambda: EntropyELBO(annealing="linear"), "annealing must be"),
])
def test_bad_schedules_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_annealing_weights_follow_the_step():
    annealing = Annealing(10, posterior=linear(2.0), prior=constant(0.5), likelihood=exponential(4.0))
    assert annealing.betas(0) == (2.0, 0.5, 4.0)
    beta_q, beta_p, beta_x = annealing.betas(5)
    assert math.isclose(beta_q, 1.5) and beta_p == 0.5 and math.isclose(beta_x, 2.0)
    assert annealing.betas(10) == (1.0, 1.0, 1.0) == annealing.betas(20)
    assert Annealing.default(10).betas(0) == (2.0, 1.0, 1.0)


def test_annealed_elbo_reports_the_true_loss_and_optimises_the_weighted_one(float64):
    model, guide, x = guide_problem("AutoNormal")
    params = [value for name, value in pyro.get_param_store().named_parameters() if name.startswith("AutoNormal")]
    annealing = Annealing(4, posterior=linear(3.0), prior=constant(2.0), likelihood=constant(0.5))
    elbo = EntropyELBO(annealing=annealing)
    plain = EntropyELBO()
    # An independent route to the weighted objective: assemble it from the three terms.
    terms = plain.terms(model, guide, x)
    weighted = -x.size(0) * (3.0 * terms.posterior_entropy - 2.0 * terms.prior_entropy - 0.5 * terms.likelihood_entropy)
    expected_grads = torch.autograd.grad(weighted, params)
    assert math.isclose(elbo.loss(model, guide, x), plain.loss(model, guide, x), rel_tol=1e-12)
    assert math.isclose(elbo.differentiable_loss(model, guide, x).item(), weighted.item(), rel_tol=1e-12)
    for param in params:
        param.grad = None
    reported = elbo.loss_and_grads(model, guide, x)
    assert math.isclose(reported, plain.loss(model, guide, x), rel_tol=1e-12)
    for param, expected in zip(params, expected_grads):
        assert torch.allclose(param.grad, expected)
    # Evaluating does not advance the schedule: only whoever owns the step count does.
    assert elbo.annealing_step == 0 and elbo.betas == (3.0, 2.0, 0.5)


def test_whoever_owns_the_step_count_drives_the_schedule_through_svi():
    model, guide, x = guide_problem("AutoNormal", dtype=torch.float64)
    elbo = EntropyELBO(annealing=Annealing(3, posterior=linear(2.0)))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    seen = []
    for completed in range(5):
        elbo.set_annealing_step(completed)
        svi.step(x)
        seen.append(elbo.betas[0])
    assert seen[0] == 2.0 and seen[3:] == [1.0, 1.0]
    with pytest.raises(ValueError, match="step must be an integer"):
        elbo.set_annealing_step(-1)


@pytest.mark.parametrize("step", [0, 2, 7])
def test_annealing_weights_apply_identically_through_svi_differentiable_loss_and_elbo_module(float64, step):
    model, guide, x = guide_problem("AutoNormal")
    params = [value for name, value in pyro.get_param_store().named_parameters() if name.startswith("AutoNormal")]
    annealing = Annealing(4, posterior=linear(3.0), prior=constant(2.0), likelihood=constant(0.5))
    elbo = EntropyELBO(annealing=annealing)
    elbo.set_annealing_step(step)
    beta_q, beta_p, beta_x = annealing.betas(step)
    # The independent route: the weighted objective assembled from the unweighted terms.
    terms = EntropyELBO().terms(model, guide, x)
    weighted = -x.size(0) * (beta_q * terms.posterior_entropy - beta_p * terms.prior_entropy
                             - beta_x * terms.likelihood_entropy)
    expected = torch.autograd.grad(weighted, params)
    routes = {
        "differentiable_loss": lambda: torch.autograd.grad(elbo.differentiable_loss(model, guide, x), params),
        "ELBOModule": lambda: torch.autograd.grad(elbo(model, guide)(x), params),
    }
    for name, route in routes.items():
        for grad, reference in zip(route(), expected):
            assert torch.allclose(grad, reference, rtol=1e-10), name
    for param in params:
        param.grad = None
    elbo.loss_and_grads(model, guide, x)  # SVI's route
    for param, reference in zip(params, expected):
        assert torch.allclose(param.grad, reference, rtol=1e-10), "loss_and_grads"


def test_the_authors_schedule_steps_the_prior_weight_down_once_an_epoch():
    annealing = Annealing.authors(steps_per_epoch=4)
    prior_weights = [annealing.betas(step)[1] for step in range(0, 24)]
    assert prior_weights == [10.0] * 4 + [8.0] * 4 + [6.0] * 4 + [4.0] * 4 + [2.0] * 4 + [1.0] * 4
    assert all(annealing.betas(step)[0] == annealing.betas(step)[2] == 1.0 for step in range(24))


def test_fit_builds_the_authors_schedule_from_its_epochs():
    from pyro_esc import fit

    model, guide, x = _small_problem()
    loss = EntropyELBO()
    fit(model, guide, x, loss=loss, batch_size=10, steps=20, annealing="authors", optimizer="rowwise", progress=False)
    assert loss.annealing.num_steps == 5 * 4  # 40 points in batches of 10: 4 steps an epoch
    assert loss.annealing.prior(0.0) == 10.0


def test_the_em_route_refuses_a_schedule_that_weights_the_prior_entropy_above_the_posteriors():
    # beta_p > beta_q makes the annealed objective unbounded (lambda -> 0); EM's exact steps would follow it.
    from pyro_esc import fit

    model, guide, x = _small_problem()
    with pytest.raises(ValueError, match=r"beta_p = 10 > beta_q = 1.*optimizer='rowwise'"):
        fit(model, guide, x, batch_size=10, steps=3, annealing="authors", progress=False)


def _small_problem():
    from pyro.infer.autoguide import AutoNormal

    from pyro_esc import SparseCoding
    from pyro_esc.data import bars

    x = bars(40, side=3, seed=0)[0]
    model = SparseCoding(9, 6)
    return model, AutoNormal(model, create_plates=model.create_plates), x
