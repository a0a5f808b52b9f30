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
    encoder = AmortizedNormal(x.size(1), true_dictionary.size(1), hidden=(20,), covariance=covariance, skip=True)
    return x, true_dictionary, model, encoder


def test_the_dictionary_stage_is_a_plain_per_point_fit():
    x, _, model, encoder = problem()
    history = fit_amortized(model, encoder, x, steps=40, match_points=300, model_samples=100, sample_steps=7, seed=3,
                            progress=False)
    with pyro.get_param_store().scope():  # beside the model trained above, which is used again below
        plain_model = SparseCoding(x.size(1), model.n_latents)
        plain = fit(plain_model, LocalMultivariateNormal(plain_model), x, steps=40, seed=3, progress=False)
    assert history.dictionary.final_elbo == pytest.approx(plain.final_elbo, rel=1e-6)
    assert history.steps == {"dictionary": 40, "encoder": 0, "joint": 0, "samples": 7}
    assert history.model_history is history.dictionary and history.stop_reason == history.dictionary.stop_reason
    capped = fit_amortized(model, encoder, x, steps=3, joint=True, encoder_steps=5, match_points=300,
                           model_samples=100, progress=False)
    assert capped.steps == {"dictionary": 3, "encoder": 3, "joint": 3, "samples": 3}  # steps limits every stage


def test_the_joint_stage_optimises_the_amortised_objective_and_reports_it():
    x, _, model, encoder = problem()
    history = fit_amortized(model, encoder, x, steps=60, match_points=300, joint=True, encoder_steps=30,
                            model_samples=0, progress=False)
    assert isinstance(history, AmortizedHistory) and history.samples is None and history.steps["samples"] == 0
    # The reported ELBO is the encoder's own posteriors' exact ELBO, evaluated independently.
    assert history.final_elbo == pytest.approx(training_elbo(model, encoder, x), rel=1e-5)
    # Each stage goes on from where the last ended, and L-BFGS with a line search only ascends.
    assert history.encoder.elbo[0] >= history.match_elbo - 1e-4
    assert history.joint.elbo[0] >= history.encoder.final_elbo - 1e-4
    assert history.final_elbo >= history.encoder.final_elbo
    assert history.encoder.final_elbo >= history.encoder.elbo[0]
    assert history.model_history is history.joint
    assert history.stop_reason == history.joint.stop_reason and not history.converged


def test_the_match_stage_reproduces_probabilistic_pca_posteriors_exactly():
    # With a Gaussian prior the exact posterior is Gaussian, its mean linear in x and its covariance the
    # same for every x: the skip connection represents it, so after the match stage alone the encoder's
    # ELBO on new points is their log-likelihood, in closed form (Tipping & Bishop 1999).
    torch.manual_seed(0)
    data_dim, n_latents = 6, 3
    model = SparseCoding(data_dim, n_latents, prior="gaussian").to(torch.float64)
    model.set_dictionary(torch.randn(data_dim, n_latents, dtype=torch.float64))
    model.set_scales(torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    x = model.sample(100)[1]
    x_test = model.sample(500)[1]
    assert x.dtype == torch.float64
    dictionary, scales, noise_var = (value.detach() for value in (model.dictionary, model.prior_scale, model.noise_var))
    encoder = AmortizedNormal(data_dim, n_latents, hidden=(10,), covariance="full", skip=True)
    history = fit_amortized(model, encoder, x, learn_dictionary=False, match_points=300, model_samples=0,
                            progress=False)
    covariance = dictionary @ torch.diag(scales.square()) @ dictionary.T + noise_var * torch.eye(data_dim)
    log_likelihood = torch.distributions.MultivariateNormal(torch.zeros(data_dim, dtype=torch.float64),
                                                            covariance).log_prob(x_test).mean()
    assert held_out_elbo(model, encoder, x_test) == pytest.approx(float(log_likelihood), abs=1e-6)
    assert history.match_elbo == pytest.approx(history.solved_elbo, abs=1e-6) == history.final_elbo
    # Without the skip connection the hidden layer alone cannot represent a linear map exactly.
    with pyro.get_param_store().scope():
        no_skip = AmortizedNormal(data_dim, n_latents, hidden=(10,), covariance="full")
        with pytest.warns(UserWarning, match="no skip connection"):
            fit_amortized(model, no_skip, x, learn_dictionary=False, match_points=300, model_samples=0,
                          progress=False)
        assert held_out_elbo(model, no_skip, x_test) < float(log_likelihood) - 1e-3


def test_the_dictionary_stage_takes_diagonal_posteriors_on_minibatches():
    # What the paper's patch scale needs: AutoNormal on minibatches (fit's EM route), then the encoder.
    x, _, model, encoder = problem(covariance="diag")
    history = fit_amortized(model, encoder, x, dictionary_guide="local-diag", batch_size=50, epochs=3,
                            match_points=300, sample_steps=5, progress=False)
    assert history.dictionary.route == "em" and history.dictionary.epoch[-1] == 3
    # The diagonal encoder was matched to diagonal optima: the solved ELBO bounds it from above.
    assert history.solved_elbo >= history.match_elbo
    assert history.final_elbo == pytest.approx(held_out_elbo(model, encoder, x), rel=1e-6)
    assert not any(name.startswith("AutoNormal") for name in pyro.get_param_store().keys())


def test_the_per_point_posteriors_leave_the_param_store():
    x, _, model, encoder = problem()
    fit_amortized(model, encoder, x, steps=5, match_points=300, sample_steps=0, progress=False)
    names = list(pyro.get_param_store().keys())
    assert not any(name.startswith("LocalMultivariateNormal") for name in names)
    assert any(name.startswith("AmortizedNormal") for name in names)


def test_learn_dictionary_false_starts_from_the_trained_dictionary():
    x, _, model, encoder = problem()
    fit(model, LocalMultivariateNormal(model), x, steps=30, progress=False)
    before = training_elbo(model, encoder, x)
    dictionary = model.dictionary.detach().clone()
    history = fit_amortized(model, encoder, x, learn_dictionary=False, match_points=300, steps=20, progress=False)
    assert history.dictionary is None and history.steps["dictionary"] == 0
    assert torch.equal(model.dictionary, dictionary)  # the model is not trained again
    assert history.final_elbo > before


def test_warm_start_finds_every_bar_and_brings_the_encoder_near_the_per_point_optimum():
    x, true_dictionary, model, _ = problem(n=1000, side=5, noise=0.3)
    encoder = AmortizedNormal(25, 10, covariance="full", skip=True)
    history = fit_amortized(model, encoder, x, match_points=5000, sample_steps=300, progress=False)
    assert bars_recovery(model.dictionary.detach(), true_dictionary).all_found
    # The per-point optimum, solved at the learned model, against the encoder: on the data and on
    # held-out points (a per-point guide fitted by encode's own optimiser, independently of the stages).
    optimum = history.solved_elbo
    assert 0 <= optimum - history.match_elbo < 0.5
    assert 0 <= optimum - history.final_elbo < optimum - history.match_elbo
    x_test, _ = bars(1000, side=5, noise=0.3, seed=1)
    held_out_optimum = held_out_elbo(model, encode(model, LocalMultivariateNormal(model), x_test), x_test)
    # (300 Adam steps here; fit_amortized's 3000 bring it to a few hundredths: BENCHMARKS.md.)
    assert 0 <= held_out_optimum - held_out_elbo(model, encoder, x_test) < 0.15


def test_the_samples_stage_trains_the_encoder_alone_and_narrows_the_held_out_gap():
    # Two runs alike up to the model-samples stage (same seeds): one stops before it.
    def run(model_samples):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        x, _, model, _ = problem(n=100)
        encoder = AmortizedNormal(x.size(1), model.n_latents, hidden=(50,), covariance="full", skip=True)
        history = fit_amortized(model, encoder, x, steps=1500, match_points=100, model_samples=model_samples,
                                sample_steps=1500, seed=1, progress=False)
        return x, model, encoder, history

    x, model_before, encoder_before, before = run(0)
    x, model, encoder, history = run(450)
    # The model is exactly the dictionary stage's; only the encoder moved.
    for name in ("dictionary", "prior_scale", "noise_var"):
        assert torch.equal(getattr(model, name), getattr(model_before, name)), name
    assert history.dictionary.final_elbo == before.dictionary.final_elbo and history.steps["samples"] == 1500
    assert history.final_elbo == pytest.approx(held_out_elbo(model, encoder, x), rel=1e-6)
    # Held-out points: the gap to per-point optima fitted at that model (an independent optimiser).
    x_test, _ = bars(500, side=4, noise=0.3, seed=1)
    optimum = held_out_elbo(model, encode(model, LocalMultivariateNormal(model), x_test), x_test)
    gap_before = optimum - held_out_elbo(model, encoder_before, x_test)
    gap_after = optimum - held_out_elbo(model, encoder, x_test)
    assert 0 <= gap_after < gap_before / 2, (gap_before, gap_after)


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
        history = fit_amortized(model, encoder, x, steps=6, match_points=200, model_samples=90, sample_steps=6,
                                sample_lr=0.01, progress=False)
    assert draws == [200] + [90] * 6  # the match stage's points, then one fresh draw per step
    stage = history.samples
    # 90 drawn points and 90 // 9 = 10 rows of the data per step; a batch estimate, by Adam.
    assert stage.num_data == 100 and stage.elbo_kind == "batch estimate" and stage.optimizer == "Adam"
    assert stage.step == list(range(1, 7)) and stage.stop_reason == "step limit: 6 steps"
    # The rate decays from sample_lr (half a cosine, towards 0).
    assert stage.lr[0] == pytest.approx(0.01) and all(a > b > 0 for a, b in zip(stage.lr, stage.lr[1:]))
    # The stage's closing evaluation is the exact ELBO on the data, as final_elbo.
    assert stage.eval_kind == "exact" and stage.eval_elbo == [pytest.approx(history.final_elbo, rel=1e-6)]
    # More rows asked for than the data have: all N of them.
    more = fit_amortized(model, encoder, x, steps=2, match_points=0, model_samples=900, sample_steps=1,
                         progress=False)
    assert more.samples.num_data == 900 + 50


@pytest.mark.parametrize("change, match", [
    (dict(model="model"), "model must be a pyro_esc.SparseCoding"),
    (dict(encoder="encoder"), "encoder must be a pyro_esc.AmortizedNormal"),
    (dict(loss=pyro.infer.Trace_ELBO()), "loss must be EntropyELBO or AnalyticELBO"),
    (dict(annealing="default", joint=True), "annealing"),
    (dict(joint=1), "joint must be True or False"),
    (dict(dictionary_guide="amortized-full"), "dictionary_guide must be one of"),
    (dict(match_points=-1), "match_points must be an integer >= 0"),
    (dict(train_dictionary=False), "train_dictionary is set by fit_amortized"),
    (dict(n_init=0), "n_init must be an integer >= 1"),
    (dict(encoder_steps=-1), "encoder_steps must be an integer >= 0"),
    (dict(model_samples=-1), "model_samples must be an integer >= 0"),
    (dict(sample_steps=1.5), "sample_steps must be an integer >= 0"),
    (dict(sample_lr=0.0), "sample_lr must be a finite number > 0"),
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
    history = fit_amortized(model, encoder, x, loss=AnalyticELBO(), steps=10, match_points=300, model_samples=50,
                            progress=False)
    # AnalyticELBO learns lambda and sigma^2: its ELBO is the one at the model's values.
    assert history.final_elbo == pytest.approx(held_out_elbo(model, encoder, x), rel=1e-5)
    # The diagonal encoder is matched to diagonal optima, which bound it from above.
    assert history.solved_elbo >= history.match_elbo > history.dictionary.elbo[0]


def test_run_bars_warm_start():
    result = run_bars("amortized-full", n=80, side=3, steps=15, warm_start=True, progress=False, reference=False)
    assert result.warm_start and result.metrics()["warm_start"] is True
    assert result.optimizer == "LBFGS" and result.steps == 15
    x, _ = bars(80, side=3, noise=0.3, seed=0)  # run_bars's data
    # The returned encoder's ELBO at the trained scales (after its last stage, on model samples).
    assert result.elbo == pytest.approx(held_out_elbo(result.model, result.guide_object, x), rel=1e-5)
    assert result.guide_object.hidden == BARS_WARM_START_HIDDEN and result.guide_object.skip
    # The warm start is the default for amortised guides on the closed-form objectives and the full data;
    # without it they keep AmortizedNormal's default width; hidden overrides both.
    assert run_bars("amortized-full", n=40, side=3, steps=2, progress=False, reference=False).warm_start
    scratch = run_bars("amortized-full", n=40, side=3, steps=2, warm_start=False, progress=False, reference=False)
    assert not scratch.warm_start and scratch.guide_object.hidden == AmortizedNormal(9, 6).hidden
    assert not scratch.guide_object.skip
    for option in (dict(optimizer="svi"), dict(objective="trace"), dict(batch_size=10)):
        assert not run_bars("amortized-full", n=40, side=3, steps=2, progress=False, reference=False,
                            **option).warm_start, option
    with pytest.raises(ValueError, match="warm_start must be 'auto', True or False"):
        run_bars("amortized-full", n=40, side=3, steps=2, warm_start="yes", progress=False, reference=False)
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
    assert "in the per-point dictionary stage, before the encoder was matched" in capsys.readouterr().out
    assert main(["bars", "--guide", "amortized-full", "--no-warm-start", "--n", "60", "--side", "3", "--steps", "6",
                 "--no-reference", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "bars_metrics.json").read_text())["warm_start"] is False
