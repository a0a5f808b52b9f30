"""The objective as a pure function: evaluating changes nothing, and its one state is safe.

Each test here reproduces a way the objective used to be unsafe (issue: "The objective as
a pure function") and checks it against an independent route: a fresh objective, the
param store before and after, Jensen's inequality, Monte Carlo with Pyro's Trace_ELBO.
"""

import warnings

import pytest
import torch

import pyro
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

from helpers import monte_carlo_check, randomize_guide
from pyro_esc import (AmortizedNormal, AnalyticELBO, EntropyELBO, LocalMultivariateNormal, SparseCoding, fit,
                      held_out_elbo, training_elbo)
from pyro_esc.data import bars


def problem(num=40, side=3, seed=3, guide="AutoNormal", name=""):
    x, _ = bars(num, side=side, seed=seed, dtype=torch.float64)
    model = SparseCoding(x.size(1), 2 * side)
    if guide == "AutoNormal":
        guide = AutoNormal(model, create_plates=model.create_plates)
    else:
        guide = LocalMultivariateNormal(model)
    randomize_guide(guide, x)
    return model, guide, x


def store_snapshot():
    return {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}


def assert_store_unchanged(before):
    after = store_snapshot()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed"


def test_evaluating_changes_neither_the_model_nor_the_next_value(float64):
    model, guide, x = problem()
    elbo = EntropyELBO()
    before = store_snapshot()
    first = elbo.loss(model, guide, x)
    elbo.differentiable_loss(model, guide, x).backward()
    elbo.terms(model, guide, x)
    with pytest.warns(RuntimeWarning, match="no running statistics"):
        elbo.differentiable_loss(model, guide, x, subsample=torch.arange(10))
    assert_store_unchanged(before)
    assert elbo.loss(model, guide, x) == first


def test_the_test_set_does_not_refit_the_trained_scales(float64):
    model, guide, x = problem(num=40)
    x_test, _ = bars(30, side=3, seed=8, dtype=torch.float64)
    encoder = AmortizedNormal(x.size(1), model.n_latents, hidden=(8,), covariance="full")
    randomize_guide(encoder, x)
    EntropyELBO().update(model, encoder, x)  # the trained scales: Theorem 2 on the training data
    trained = model.prior_scale.detach().clone(), model.noise_var.detach().clone()
    EntropyELBO().loss(model, encoder, x_test)
    AnalyticELBO().loss(model, encoder, x_test)
    assert torch.equal(model.prior_scale.detach(), trained[0]) and torch.equal(model.noise_var.detach(), trained[1])
    held_out = held_out_elbo(model, encoder, x_test)
    refitted = training_elbo(model, encoder, x_test)
    # L_H re-fits lambda, sigma^2 to the test data, so it can only be higher (it maximises over them).
    assert refitted > held_out
    # The held-out ELBO is the standard ELBO at the trained scales: Pyro's Monte Carlo agrees.
    estimate, standard_error, _ = monte_carlo_check(model, encoder, x_test, num_particles=3000)
    assert abs(-estimate / x_test.size(0) - held_out) < 4 * standard_error / x_test.size(0)


def test_one_objective_serves_two_guides_on_the_same_data(float64):
    model, guide_a, x = problem(num=40)
    guide_b = LocalMultivariateNormal(model, init_scale=0.3)
    randomize_guide(guide_b, x, seed=4)
    batch = torch.tensor([1, 7, 12, 30, 39])
    elbo = EntropyELBO()
    elbo.loss_and_grads(model, guide_a, x, subsample=batch)  # a training call: builds guide A's table
    # Guide B on the same data must not see guide A's statistics: a fresh objective is the reference.
    reference = EntropyELBO().loss(model, guide_b, x, subsample=batch)
    assert elbo.loss(model, guide_b, x, subsample=batch) == pytest.approx(reference, rel=1e-12)
    assert EntropyELBO().loss(model, guide_b, x) == pytest.approx(reference, rel=1e-12)  # no table: exact


def test_a_table_is_not_reused_for_changed_data(float64):
    model, guide, x = problem(num=40)
    elbo = EntropyELBO()
    batch = torch.tensor([0, 5, 9])
    elbo.update(model, guide, x, subsample=batch)
    with torch.no_grad():
        x[3] += 1.0  # in place: the stored rows no longer describe x
    with pytest.warns(RuntimeWarning, match="data tensor changed"):
        elbo.update(model, guide, x, subsample=batch)
    assert elbo.loss(model, guide, x, subsample=batch) == pytest.approx(EntropyELBO().loss(model, guide, x), rel=1e-12)


def test_a_fresh_data_tensor_every_step_is_reported_and_the_same_one_is_silent(float64):
    model, guide, x = problem(num=40)
    elbo = EntropyELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    svi.step(x, subsample=torch.arange(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.step(x, subsample=torch.arange(8, 16))  # same tensor: no pass over the data, no warning
    with pytest.warns(RuntimeWarning, match="pass the same, unchanged tensor"):
        svi.step(x.clone(), subsample=torch.arange(8))


def test_repeated_indices_are_rejected_by_running_statistics(float64):
    model, guide, x = problem(num=40)
    with pytest.raises(ValueError, match="must not repeat"):
        EntropyELBO().loss(model, guide, x, subsample=torch.tensor([1, 2, 2]))
    with pytest.raises(ValueError, match="must not repeat"):
        EntropyELBO().update(model, guide, x, subsample=torch.tensor([4, 4]))


def test_batch_statistics_are_biased_upwards_and_running_ones_are_not(float64):
    # Jensen's inequality, exactly: over a partition into equal batches the mean of the batch
    # means is the full mean, and -log is convex, so the batch estimates average to more than L_H.
    model, guide, x = problem(num=40)
    exact = -EntropyELBO().loss(model, guide, x)
    batches = torch.randperm(40).reshape(8, 5)
    batch_estimates = [-EntropyELBO(minibatch_statistics="batch").loss(model, guide, x, subsample=b) for b in batches]
    assert sum(batch_estimates) / len(batch_estimates) > exact + 1e-3 * abs(exact)
    running = EntropyELBO()
    running.update(model, guide, x, subsample=batches[0])  # builds the table at the current parameters
    for b in batches:
        assert -running.loss(model, guide, x, subsample=b) == pytest.approx(exact, rel=1e-12)


def test_update_writes_theorem2_scales_of_the_parameters_it_sees(float64):
    model, guide, x = problem(num=40)
    terms = EntropyELBO().update(model, guide, x)
    # A second route to Theorem 2: the scales at which AnalyticELBO is stationary equal the written ones,
    # so AnalyticELBO equals L_H there.
    assert AnalyticELBO().loss(model, guide, x) == pytest.approx(-x.size(0) * float(terms.elbo), rel=1e-10)
    assert torch.allclose(model.prior_scale.detach(), terms.prior_scale)


def test_full_batch_fit_records_the_exact_elbo_after_each_step_and_leaves_the_model_current():
    x, _ = bars(60, side=3, seed=2)
    model = SparseCoding(x.size(1), 6)
    guide = AutoNormal(model)
    history = fit(model, guide, x, steps=15, progress=False)
    assert history.elbo_kind == "exact" and history.eval_step == [15]
    exact = training_elbo(model, guide, x)
    assert history.elbo[-1] == pytest.approx(exact, rel=1e-6) and history.final_elbo == pytest.approx(exact, rel=1e-6)
    # The model holds Theorem 2's scales of the final parameters, not of the step before.
    expected = EntropyELBO().terms(model, guide, x)
    assert torch.allclose(model.prior_scale.detach(), expected.prior_scale.detach(), rtol=1e-6)
    assert torch.allclose(model.noise_var.detach(), expected.noise_var.detach(), rtol=1e-6)


@pytest.mark.parametrize("optimizer, kind", [("rowwise", "running estimate"), ("em", "chunk estimate")])
def test_minibatch_fit_labels_running_estimates_and_records_exact_values(optimizer, kind):
    x, _ = bars(60, side=3, seed=2)
    model = SparseCoding(x.size(1), 6)
    guide = AutoNormal(model, create_plates=model.create_plates)
    history = fit(model, guide, x, epochs=4, batch_size=20, optimizer=optimizer, progress=False)
    assert history.elbo_kind == kind and history.eval_kind == "exact"
    assert history.eval_step == [3, 6, 9, 12]  # once per epoch of 3 steps
    assert history.final_elbo == pytest.approx(training_elbo(model, guide, x), rel=1e-6)
    assert history.final_elbo != history.elbo[-1]  # the running estimate is stale for two thirds of the points


def test_a_model_subclass_that_changes_the_model_is_rejected():
    class Tempered(SparseCoding):
        def forward(self, x, subsample=None, subsample_size=None):
            with poutine.scale(scale=0.5):
                return super().forward(x, subsample, subsample_size)

    x, _ = bars(20, side=3)
    model = Tempered(9, 6)
    guide = AutoNormal(model)
    for objective in (EntropyELBO(), AnalyticELBO()):
        with pytest.raises(ValueError, match="overrides SparseCoding.forward"):
            objective.loss(model, guide, x)


@pytest.mark.parametrize("handler", [lambda: poutine.scale(scale=0.5), lambda: poutine.mask(mask=False)])
def test_handlers_around_a_closed_form_objective_are_rejected(handler):
    x, _ = bars(20, side=3)
    model = SparseCoding(9, 6)
    guide = AutoNormal(model)
    EntropyELBO().loss(model, guide, x)
    for objective in (EntropyELBO(), AnalyticELBO()):
        with handler(), pytest.raises(ValueError, match="cannot honour the effect handlers"):
            objective.loss(model, guide, x)
    with pytest.raises(ValueError, match="not wrapped in effect handlers"):
        EntropyELBO().loss(poutine.scale(model, scale=0.5), guide, x)


def test_constant_data_is_refused_before_training_and_announced_by_the_model():
    x = torch.zeros(30, 9)
    model = SparseCoding(9, 6)
    with pytest.raises(ValueError, match="data must vary"):
        fit(model, AutoNormal(model), x, steps=3, progress=False)
    with pytest.warns(RuntimeWarning, match="every data point is the same"):
        model(x)


# ------------------------------------------------------------------------------------------ explicit state

def test_evaluate_is_a_pure_function_of_its_state(float64):
    # The functional core: evaluate reads the running statistics it is given and changes nothing; commit is the one
    # call that changes them (and the model). The same state gives the same value, a different state another.
    model, guide, x = problem()
    loss = EntropyELBO()
    statistics = loss.init_statistics(model, guide, x)
    tables = [column.clone() for column in (statistics.entropy, statistics.statistic, statistics.sq_error)]
    before, scales = store_snapshot(), (model.prior_scale.detach().clone(), model.noise_var.detach().clone())
    subsample = torch.tensor([3, 1, 7])
    first = loss.evaluate(model, guide, x, subsample, statistics)
    second = loss.evaluate(model, guide, x, subsample, statistics)
    assert torch.equal(first.loss, second.loss) and not loss._tables
    assert all(torch.equal(a, b) for a, b in zip(tables, (statistics.entropy, statistics.statistic,
                                                          statistics.sq_error)))
    assert_store_unchanged(before)
    assert torch.equal(model.prior_scale, scales[0]) and torch.equal(model.noise_var, scales[1])
    # Without its state a running minibatch evaluation is refused, not silently computed from another.
    with pytest.raises(ValueError, match="init_statistics"):
        loss.evaluate(model, guide, x, subsample)
    # On the full data the minibatch value with every row current is the exact one (an independent route:
    # the state is not read there).
    exact = loss.evaluate(model, guide, x).loss
    full = loss.evaluate(model, guide, x, torch.arange(x.size(0)), statistics).loss
    assert torch.allclose(full, exact, rtol=1e-12)


def test_fit_keeps_its_running_statistics_itself_and_matches_a_plain_svi_loop(float64):
    # fit's SVI route on minibatches owns its state (the objective keeps none afterwards) and trains exactly as a
    # plain Pyro loop on the same batches does, whose objective keeps the state itself (SVI + elbo.update).
    from pyro_esc.train.options import _Batches

    x, _ = bars(24, side=3, seed=3, dtype=torch.float64)
    steps, batch_size, lr = 6, 8, 0.05

    def start():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = SparseCoding(x.size(1), 6)
        return model, AutoNormal(model, create_plates=model.create_plates)

    model, guide = start()
    loss = EntropyELBO()
    fit(model, guide, x, loss=loss, optimizer="svi", batch_size=batch_size, steps=steps, lr=lr, seed=0,
        progress=False)
    learned = store_snapshot()
    assert not loss._tables  # the run's statistics were the loop's, not the objective's

    model, guide = start()
    batches = _Batches(x.size(0), batch_size, 0)  # fit's minibatches for seed 0
    loss = EntropyELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=loss)
    pyro.set_rng_seed(0)
    for _ in range(steps):
        subsample = batches.next()
        svi.step(x, subsample=subsample)
        loss.update(model, guide, x, subsample=subsample)
    for name, value in store_snapshot().items():
        assert torch.allclose(learned[name], value, rtol=1e-9, atol=1e-12), name


def test_a_plain_svi_loop_leaves_the_model_at_the_scales_it_trained_with(float64):
    # Pyro's own loop, no elbo.update: the model's lambda, sigma^2 used to stay at their initial values, so
    # AnalyticELBO, held_out_elbo and log_likelihood read stale scales (1.07 nats off after 1500 steps). SVI's
    # training call now writes the scales of the parameters it evaluated: the standard ELBO at the model's scales
    # (an independent closed form) is then the entropy form's to within one step's change, and update makes it exact.
    model, guide, x = problem(num=60)
    elbo = EntropyELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), loss=elbo)
    for _ in range(300):
        svi.step(x)
    entropy_form, standard = -elbo.loss(model, guide, x), -AnalyticELBO().loss(model, guide, x)
    assert standard <= entropy_form + 1e-9  # the scales are optimal for L_H; any others give less
    assert entropy_form - standard < 1e-3 * x.size(0)
    elbo.update(model, guide, x)
    assert -AnalyticELBO().loss(model, guide, x) == pytest.approx(-elbo.loss(model, guide, x), rel=1e-10)
