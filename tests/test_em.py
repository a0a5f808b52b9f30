"""The EM route of fit: solved posteriors and a closed-form model update, against independent routes.

- full-batch EM converges to a stationary point of the exact joint objective (L-BFGS started there
  finds nothing more);
- with the dictionary held fixed it reaches the ELBO of an L-BFGS fit with train_dictionary=False;
- every value it reports is the ELBO that AnalyticELBO computes from the guide's rows and the model;
- plain EM (no momentum) never lowers the exact ELBO;
- minibatches whose chunk is all N points take the same M-steps as the full batch;
- annealing weights reach the E-step; checkpoints resume bit-for-bit.
"""

import pytest
import torch

import pyro
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_esc import AnalyticELBO, EntropyELBO, LocalMultivariateNormal, SparseCoding, fit, held_out_elbo
from pyro_esc.annealing import Annealing, linear
from pyro_esc.data import bars
from pyro_esc.em import EM, EMStep
from pyro_esc.evaluation import training_elbo
from pyro_esc.metrics import bars_recovery

GUIDES = {"diag": lambda model: AutoNormal(model, create_plates=model.create_plates),
          "full": LocalMultivariateNormal}


def problem(family="full", n=120, side=3, seed=0, noise=0.3):
    x, true = bars(n, side=side, noise=noise, seed=seed)
    x = x.double()
    model = SparseCoding(x.size(1), 2 * side).double()
    return model, GUIDES[family](model), x, true


def parameters():
    return {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}


@pytest.mark.parametrize("family", ["diag", "full"])
def test_full_batch_em_converges_to_an_optimum_of_the_joint_objective(family):
    model, guide, x, true = problem(family, n=80)
    em = fit(model, guide, x, optimizer="em", tol=1e-10, steps=3000, progress=False, seed=1)
    assert em.route == "em" and em.converged
    found = bars_recovery(model.dictionary, true).num_found
    # L-BFGS on the exact joint objective (posteriors and dictionary together), started where EM
    # stopped, finds nothing more: EM's fixed point is a stationary point of the ELBO.
    lbfgs = fit(model, guide, x, optimizer="lbfgs", tol=1e-12, progress=False, seed=1)
    assert lbfgs.final_elbo - em.final_elbo < 2e-6
    assert bars_recovery(model.dictionary, true).num_found == found


@pytest.mark.parametrize("family", ["diag", "full"])
def test_em_with_the_dictionary_fixed_reaches_the_lbfgs_fit(family):
    model, guide, x, true = problem(family)
    model.set_dictionary(true.double())
    history = fit(model, guide, x, optimizer="em", train_dictionary=False, tol=1e-11, progress=False)
    assert torch.allclose(model.dictionary.detach(), true.double() / true.double().norm(dim=0))
    pyro.clear_param_store()
    model, guide, x, _ = problem(family)
    model.set_dictionary(true.double())
    reference = fit(model, guide, x, optimizer="lbfgs", train_dictionary=False, tol=1e-11, progress=False)
    assert history.final_elbo == pytest.approx(reference.final_elbo, abs=1e-6)


@pytest.mark.parametrize("family", ["diag", "full"])
def test_the_reported_value_is_the_analytic_elbo_of_the_rows(family):
    model, guide, x, _ = problem(family)
    step = EMStep(model, guide, EntropyELBO(), x, momentum=0.5)
    for _ in range(4):
        value, grad_norm = step.step(x, {})
        assert grad_norm is None
        # AnalyticELBO reads the guide's rows (in the M-step's gauge) and the model's lambda, sigma^2.
        assert value == pytest.approx(AnalyticELBO().loss(model, guide, x), rel=1e-10)
        # After the M-step lambda, sigma^2 are Theorem 2's for these rows: EntropyELBO gives the same number.
        assert value == pytest.approx(EntropyELBO().loss(model, guide, x), rel=1e-10)


def test_plain_em_never_lowers_the_elbo():
    model, guide, x, _ = problem("full", seed=3)
    history = fit(model, guide, x, optimizer=EM(momentum=0.0), steps=60, tol=None, progress=False)
    assert all(b >= a - 1e-9 for a, b in zip(history.elbo, history.elbo[1:]))


def test_momentum_converges_faster_than_plain_em():
    steps, elbos = {}, {}
    for momentum in (0.0, 0.9):
        pyro.clear_param_store()
        model, guide, x, _ = problem("full", n=60, seed=0)
        history = fit(model, guide, x, optimizer=EM(momentum=momentum), tol=1e-7, steps=1500, progress=False)
        steps[momentum], elbos[momentum] = history.step[-1], history.final_elbo
    assert steps[0.9] < steps[0.0] / 2
    assert elbos[0.9] >= elbos[0.0] - 1e-4


def test_minibatches_with_a_chunk_of_all_points_take_the_full_batch_steps():
    model, guide, x, _ = problem("diag", n=100)
    full = fit(model, guide, x, optimizer=EM(momentum=0.0), steps=5, tol=None, progress=False)
    full_dictionary = model.dictionary.detach().clone()
    pyro.clear_param_store()
    model, guide, x, _ = problem("diag", n=100)
    batched = fit(model, guide, x, optimizer=EM(momentum=0.0, chunk=100), batch_size=20, epochs=5, progress=False)
    assert batched.route == "em"
    assert torch.allclose(model.dictionary.detach(), full_dictionary, atol=1e-8)
    assert batched.final_elbo == pytest.approx(full.final_elbo, abs=1e-7)


def test_minibatch_em_is_the_default_for_per_point_guides_and_improves_the_elbo():
    model, guide, x, _ = problem("diag", n=400)
    history = fit(model, guide, x, batch_size=50, epochs=6, progress=False)
    assert history.route == "em" and history.optimizer == "EM"
    assert history.eval_elbo[-1] > history.eval_elbo[0]
    # The last E-step solved every point at the final model: the rows are the model's own posteriors.
    assert history.final_elbo == pytest.approx(training_elbo(model, guide, x), abs=1e-9)


def test_annealing_weights_reach_the_e_step():
    model, guide, x, _ = problem("full")
    annealing = Annealing(6, posterior=linear(8.0), prior=linear(4.0))
    history = fit(model, guide, x, optimizer="em", steps=10, tol=None, annealing=annealing, progress=False)
    assert history.betas[0] == [8.0, 4.0, 1.0] and history.betas[-1] == [1.0, 1.0, 1.0]
    pyro.clear_param_store()
    model, guide, x, _ = problem("full")
    plain = fit(model, guide, x, optimizer="em", steps=10, tol=None, progress=False)
    assert plain.elbo[0] != pytest.approx(history.elbo[0], abs=1e-3)


@pytest.mark.parametrize("batch_size", [None, 30])
def test_checkpoints_resume_bit_for_bit(tmp_path, batch_size):
    def train(path=None, resume=None, steps=9):
        pyro.clear_param_store()
        model, guide, x, _ = problem("diag", n=90)
        history = fit(model, guide, x, optimizer=EM(chunk=60), steps=steps, batch_size=batch_size, tol=None,
                      progress=False, checkpoint=path, resume=resume, seed=4)
        return parameters(), history

    straight, straight_history = train()
    path = str(tmp_path / "em.pt")
    train(path, steps=4)
    resumed, resumed_history = train(path, resume=path)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert straight_history.loss == resumed_history.loss


def test_train_model_false_solves_the_posteriors_only():
    model, guide, x, _ = problem("full")
    fit(model, guide, x, optimizer="em", steps=3, tol=None, progress=False)
    before = {name: value for name, value in parameters().items() if "Local" not in name}
    fit(model, guide, x, optimizer="em", train_model=False, steps=2, tol=None, progress=False)
    after = parameters()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert held_out_elbo(model, guide, x) == pytest.approx(held_out_elbo(model, guide, x))


@pytest.mark.parametrize("kwargs, make_guide, message", [
    (dict(optimizer="em", lr=0.1), GUIDES["diag"], "lr: the EM route has no learning rate"),
    (dict(optimizer="em", inner_steps=3, batch_size=10), GUIDES["diag"], "inner_steps"),
    (dict(optimizer="em", gtol=1e-3), GUIDES["diag"], "gtol: the EM route has no gradient"),
    (dict(optimizer="em", loss=Trace_ELBO()), GUIDES["diag"], "needs a closed-form objective"),
    (dict(optimizer="em"), AutoMultivariateNormal, "solves per-point Gaussian guides"),
])
def test_bad_options_are_clear_errors(kwargs, make_guide, message):
    x, _ = bars(30, side=3, seed=0)
    model = SparseCoding(9, 6)
    with pytest.raises(ValueError, match=message):
        fit(model, make_guide(model), x, steps=2, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(momentum=1.0), "momentum must be None or a number in"),
    (dict(momentum=-0.1), "momentum must be None or a number in"),
    (dict(chunk=0), "chunk must be an integer"),
    (dict(tol=0.0), "tol must be a finite number > 0"),
])
def test_bad_em_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EM(**kwargs)


def test_the_default_chunk_and_momentum():
    em = EM()
    assert em.chunk_for(1000, 1000) == 1000 and em.chunk_for(1000, None or 1000) == 1000
    assert em.chunk_for(20000, 512) == 5120  # a tenth, at least MIN_CHUNK
    assert em.chunk_for(3000, 100) == 3000  # ... and at most N
    assert em.chunk_for(10 ** 6, 512) == 12800  # ... and at most DEFAULT_CHUNK
    assert EM(chunk=700).chunk_for(500, 50) == 500
    # The extrapolation pays off where the M-steps are exact (all points), not on a chunk's noisy statistics.
    assert em.momentum_for(1000, 1000) == 0.9 and em.momentum_for(5120, 20000) == 0.0
    assert EM(momentum=0.5).momentum_for(5120, 20000) == 0.5
