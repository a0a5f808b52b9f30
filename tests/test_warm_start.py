"""fit_amortized: amortised training warm-started from per-point posteriors."""

import warnings

import pytest
import pyro
import torch

from pyro_esc import (AmortizedNormal, AnalyticELBO, LocalMultivariateNormal, SparseCoding, encode, fit,
                      fit_amortized, held_out_elbo, load, training_elbo)
from pyro_esc.data import bars
from pyro_esc.experiments import BARS_WARM_START_HIDDEN, run_bars
from pyro_esc.metrics import bars_recovery
from pyro_esc.training import ConvergenceWarning
from pyro_esc.warm_start import AmortizedHistory


@pytest.fixture(autouse=True)
def quiet():
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step-limit ConvergenceWarnings of the short runs
        yield


def problem(n=200, side=4, noise=0.3, covariance="full"):
    x, true_dictionary = bars(n, side=side, noise=noise, seed=0)
    model = SparseCoding(x.size(1), true_dictionary.size(1))
    encoder = AmortizedNormal(x.size(1), true_dictionary.size(1), hidden=(20,), covariance=covariance)
    return x, true_dictionary, model, encoder


def test_the_dictionary_stage_is_a_plain_per_point_fit():
    x, _, model, encoder = problem()
    history = fit_amortized(model, encoder, x, steps=40, encoder_steps=5, model_samples=100, sample_steps=7, seed=3,
                            progress=False)
    with pyro.get_param_store().scope():  # beside the model trained above, which is used again below
        plain_model = SparseCoding(x.size(1), model.n_latents)
        plain = fit(plain_model, LocalMultivariateNormal(plain_model), x, steps=40, seed=3, progress=False)
    assert history.dictionary.final_elbo == pytest.approx(plain.final_elbo, rel=1e-6)
    assert history.steps == {"dictionary": 40, "encoder": 5, "joint": 40, "samples": 7}
    capped = fit_amortized(model, encoder, x, steps=3, encoder_steps=5, model_samples=100, progress=False)
    assert capped.steps == {"dictionary": 3, "encoder": 3, "joint": 3, "samples": 3}  # steps limits every stage


def test_the_joint_stage_optimises_the_amortised_objective_and_reports_it():
    x, _, model, encoder = problem()
    history = fit_amortized(model, encoder, x, steps=60, encoder_steps=30, model_samples=0, progress=False)
    assert isinstance(history, AmortizedHistory) and history.samples is None and history.steps["samples"] == 0
    # The reported ELBO is the encoder's own posteriors' exact ELBO, evaluated independently.
    assert history.final_elbo == pytest.approx(training_elbo(model, encoder, x), rel=1e-5)
    # Each stage goes on from where the last ended, and L-BFGS with a line search only ascends.
    assert history.joint.elbo[0] >= history.encoder.final_elbo - 1e-4
    assert history.final_elbo >= history.encoder.final_elbo
    assert history.encoder.final_elbo >= history.encoder.elbo[0]
    assert history.stop_reason == history.joint.stop_reason and not history.converged


def test_the_per_point_posteriors_leave_the_param_store():
    x, _, model, encoder = problem()
    fit_amortized(model, encoder, x, steps=5, encoder_steps=2, sample_steps=0, progress=False)
    names = list(pyro.get_param_store().keys())
    assert not any(name.startswith("LocalMultivariateNormal") for name in names)
    assert any(name.startswith("AmortizedNormal") for name in names)


def test_learn_dictionary_false_starts_from_the_trained_dictionary():
    x, _, model, encoder = problem()
    fit(model, LocalMultivariateNormal(model), x, steps=30, progress=False)
    before = training_elbo(model, encoder, x)
    history = fit_amortized(model, encoder, x, learn_dictionary=False, steps=20, encoder_steps=20, model_samples=0,
                            progress=False)
    assert history.dictionary is None and history.steps["dictionary"] == 0
    assert history.final_elbo > before


def test_warm_start_keeps_every_bar_that_the_per_point_stage_found():
    x, true_dictionary, model, _ = problem(n=1000, side=5, noise=0.3)
    encoder = AmortizedNormal(25, 10, covariance="full")
    history = fit_amortized(model, encoder, x, steps=1000, encoder_steps=500, model_samples=0, progress=False)
    assert bars_recovery(model.dictionary.detach(), true_dictionary).all_found
    assert history.final_elbo > history.encoder.final_elbo


def test_the_samples_stage_trains_the_encoder_alone_and_narrows_the_held_out_gap():
    # Two runs alike up to the model-samples stage (same seeds): one stops before it.
    def run(model_samples):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        x, _, model, _ = problem(n=100)
        # More weights than 100 points pin down: the encoder overfits them in the joint stage.
        encoder = AmortizedNormal(x.size(1), model.n_latents, hidden=(50,), covariance="full")
        history = fit_amortized(model, encoder, x, steps=1500, encoder_steps=50, model_samples=model_samples,
                                sample_steps=1500, seed=1, progress=False)
        return x, model, encoder, history

    x, model_before, encoder_before, before = run(0)
    x, model, encoder, history = run(450)
    # The model is exactly the joint stage's; only the encoder moved.
    for name in ("dictionary", "prior_scale", "noise_var"):
        assert torch.equal(getattr(model, name), getattr(model_before, name)), name
    assert history.joint.final_elbo == before.joint.final_elbo and history.steps["samples"] == 1500
    assert history.final_elbo == pytest.approx(held_out_elbo(model, encoder, x), rel=1e-6)
    # Held-out points: the gap to per-point optima fitted at that model (an independent optimiser).
    x_test, _ = bars(500, side=4, noise=0.3, seed=1)
    optimum = held_out_elbo(model, encode(model, LocalMultivariateNormal(model), x_test), x_test)
    gap_before = optimum - held_out_elbo(model, encoder_before, x_test)
    gap_after = optimum - held_out_elbo(model, encoder, x_test)
    assert 0 <= gap_after < gap_before / 3, (gap_before, gap_after)


def test_the_samples_stage_draws_new_points_at_every_step(monkeypatch):
    x, _, model, encoder = problem(n=50)
    draws = []
    sample = SparseCoding.sample

    def recorded(self, n):
        draws.append(n)
        return sample(self, n)

    monkeypatch.setattr(SparseCoding, "sample", recorded)
    with warnings.catch_warnings():
        # Any warning but the short fit stages' step limits is an error (e.g. a scalar taken from a
        # tensor that requires grad, at every step of the stage).
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        history = fit_amortized(model, encoder, x, steps=6, encoder_steps=2, model_samples=90, sample_steps=6,
                                sample_lr=0.01, progress=False)
    assert draws == [90] * 6  # one fresh draw per step, nothing drawn by the other stages
    stage = history.samples
    # 90 drawn points and 90 // 9 = 10 rows of the data per step; a batch estimate, by Adam.
    assert stage.num_data == 100 and stage.elbo_kind == "batch estimate" and stage.optimizer == "Adam"
    assert stage.step == list(range(1, 7)) and stage.stop_reason == "step limit: 6 steps"
    # The rate decays from sample_lr (half a cosine, towards 0).
    assert stage.lr[0] == pytest.approx(0.01) and all(a > b > 0 for a, b in zip(stage.lr, stage.lr[1:]))
    # The stage's closing evaluation is the exact ELBO on the data, as final_elbo.
    assert stage.eval_kind == "exact" and stage.eval_elbo == [pytest.approx(history.final_elbo, rel=1e-6)]
    # More rows asked for than the data have: all N of them.
    more = fit_amortized(model, encoder, x, steps=2, encoder_steps=1, model_samples=900, sample_steps=1,
                         progress=False)
    assert more.samples.num_data == 900 + 50


@pytest.mark.parametrize("change, match", [
    (dict(model="model"), "model must be a pyro_esc.SparseCoding"),
    (dict(encoder="encoder"), "encoder must be a pyro_esc.AmortizedNormal"),
    (dict(loss=pyro.infer.Trace_ELBO()), "loss must be EntropyELBO or AnalyticELBO"),
    (dict(batch_size=10), "full data"),
    (dict(annealing="default"), "annealing"),
    (dict(train_dictionary=False), "train_dictionary is set by fit_amortized"),
    (dict(n_init=0), "n_init must be an integer >= 1"),
    (dict(encoder_steps=-1), "encoder_steps must be an integer >= 0"),
    (dict(model_samples=-1), "model_samples must be an integer >= 0"),
    (dict(sample_steps=1.5), "sample_steps must be an integer >= 0"),
    (dict(sample_lr=0.0), "sample_lr must be a finite number > 0"),
    (dict(optimizer="svi"), "optimizer"),
    (dict(learn_dictionary=False), "never trained"),
])
def test_bad_input_is_refused_naming_the_argument(change, match):
    x, _, model, encoder = problem(n=50)
    arguments = dict(model=model, encoder=encoder, data=x, steps=2, progress=False)
    arguments.update(change)
    with pytest.raises(ValueError, match=match):
        fit_amortized(**arguments)


def test_the_analytic_objective_takes_the_same_stages():
    x, _, model, encoder = problem(n=100, covariance="diag")
    history = fit_amortized(model, encoder, x, loss=AnalyticELBO(), steps=10, encoder_steps=5, model_samples=50,
                            progress=False)
    # AnalyticELBO learns lambda and sigma^2: its ELBO is the one at the model's values.
    assert history.final_elbo == pytest.approx(held_out_elbo(model, encoder, x), rel=1e-5)
    assert history.final_elbo > history.encoder.elbo[0]


def test_run_bars_warm_start():
    result = run_bars("amortized-full", n=80, side=3, steps=15, warm_start=True, progress=False, reference=False)
    assert result.warm_start and result.metrics()["warm_start"] is True
    assert result.optimizer == "LBFGS" and result.steps == 15
    x, _ = bars(80, side=3, noise=0.3, seed=0)  # run_bars's data
    # The returned encoder's ELBO at the trained scales (the model-samples stage ran after the joint one).
    assert result.elbo == pytest.approx(held_out_elbo(result.model, result.guide_object, x), rel=1e-5)
    assert result.guide_object.hidden == BARS_WARM_START_HIDDEN
    # Without warm_start, amortised guides keep AmortizedNormal's default width; hidden overrides both.
    assert run_bars("amortized-full", n=40, side=3, steps=2, progress=False,
                    reference=False).guide_object.hidden == AmortizedNormal(9, 6).hidden
    assert run_bars("amortized-full", n=40, side=3, steps=2, warm_start=True, hidden=(7, 5), progress=False,
                    reference=False).guide_object.hidden == (7, 5)
    with pytest.raises(ValueError, match="hidden sets the encoder of amortised guides"):
        run_bars("local-full", n=40, side=3, steps=2, hidden=(20,), progress=False, reference=False)
    with pytest.raises(ValueError, match="warm_start trains amortised guides"):
        run_bars("local-full", n=40, side=3, steps=2, warm_start=True, progress=False, reference=False)
    with pytest.raises(ValueError, match="closed-form objective on the full data"):
        run_bars("amortized-full", n=40, side=3, steps=2, warm_start=True, optimizer="svi", progress=False,
                 reference=False)


def test_the_bars_command_takes_warm_start(tmp_path, capsys):
    import json

    from pyro_esc.cli import main

    out = tmp_path / "bars"
    assert main(["bars", "--guide", "amortized-full", "--warm-start", "--n", "60", "--side", "3", "--steps", "6",
                 "--hidden", "20", "10", "--no-reference", "--out", str(out), "--quiet"]) == 0
    with pyro.get_param_store().scope():  # the command's model is still in the store
        assert load(str(out / "bars_model.pt"))[1].hidden == (20, 10)
    metrics = json.loads((out / "bars_metrics.json").read_text())
    assert metrics["warm_start"] is True and metrics["steps"] == 6 and metrics["hidden"] == [20, 10]
    assert "in the joint stage, after the per-point and encoder stages and before the model-samples stage" in capsys.readouterr().out
