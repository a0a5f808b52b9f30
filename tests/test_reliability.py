"""Nothing silently wrong: each case here returned a wrong number, lost work or failed with a raw traceback.

- annealing on the L-BFGS route ended on the annealed objective (the run came to rest before its schedule
  did), or a schedule longer than the run ended partway;
- resuming an SVI run with ``AmortizedNormal`` left the encoder untrained (the guide computed with other
  tensors than the optimiser's) and a learning-rate schedule was not resumed bit-for-bit;
- evaluation read whatever the param-store scope held, and a per-point guide evaluated other data of the
  same size without a word;
- float16/bfloat16 data, data near float32's limits, ``seed=None``, an integer dtype and
  ``device="meta"`` failed deep inside torch; the command line failed after training on paths it could
  have checked first.
"""

import math
import os

import numpy as np
import pytest
import torch

import pyro
from pyro.infer.autoguide import AutoNormal

from pyro_esc import (AmortizedNormal, LocalMultivariateNormal, SparseCoding, fit, held_out_elbo, save,
                      training_elbo)
from pyro_esc.annealing import Annealing, constant
from pyro_esc.cli import main
from pyro_esc.data import bars
from pyro_esc.denoising import denoise
from pyro_esc.training import ConvergenceWarning


def autonormal(model):
    return AutoNormal(model, create_plates=model.create_plates)


def amortized(model):
    return AmortizedNormal(model.data_dim, model.n_latents, hidden=(8,))


# ---------------------------------------------------------------------------------------------- annealing

def test_lbfgs_at_rest_on_the_annealed_objective_goes_on_with_the_true_one():
    # beta_q = 1.1 throughout a schedule of 5000 steps: L-BFGS converges on that objective long before the
    # schedule ends, and used to return its optimum as the model.
    x = bars(60, side=3, noise=0.1, seed=0)[0].double()
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6).double()
        guide = LocalMultivariateNormal(model)
        history = fit(model, guide, x, annealing=Annealing(5000, posterior=constant(1.1)), steps=10000,
                      progress=False)
        assert history.annealing_cut is not None and history.annealing_cut < 5000
        assert history.betas[-1] == [1.0, 1.0, 1.0]
        assert history.converged and "annealing cut at step" in history.stop_reason
        # What is reported is the ELBO itself, where the convergence test held for it.
        assert math.isclose(history.final_elbo, training_elbo(model, guide, x), rel_tol=1e-9)
        with pyro.get_param_store().scope():
            plain_model = SparseCoding(9, 6).double()
            plain = fit(plain_model, LocalMultivariateNormal(plain_model), x, steps=10000, progress=False)
        assert abs(history.final_elbo - plain.final_elbo) < 0.1


def test_a_float32_stall_under_annealing_goes_on_in_float64_with_the_schedule():
    # Where float32 stalls, the run goes on in float64 with the schedule still running; a cut is only made
    # where the optimiser has come to rest in float64.
    x = bars(100, noise=0.1, seed=0)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(25, 10)
        history = fit(model, LocalMultivariateNormal(model), x, annealing=Annealing.default(500), steps=1000,
                      progress=False)
    assert history.finish_step is not None and history.finish_step < 500
    assert history.betas[history.step.index(history.finish_step) + 1][0] > 1.0
    assert history.betas[-1] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("optimizer, batch_size", [("lbfgs", None), ("rowwise", 20), ("svi", 20)])
def test_a_schedule_longer_than_the_run_is_refused(optimizer, batch_size):
    x = bars(60, side=3, seed=0)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6)
        with pytest.raises(ValueError, match="runs 1000 steps, but this run has 10"):
            fit(model, autonormal(model), x, optimizer=optimizer, batch_size=batch_size, steps=10,
                annealing=Annealing.default(1000), progress=False)


# ---------------------------------------------------------------------------------------------- honest stops

class OwnAutoNormal(AutoNormal):
    """A guide of the user's own: fit cannot know how to rescale it, so it trains in the data's units."""


@pytest.mark.parametrize("optimizer", ["rowwise", "svi"])
def test_a_model_that_explains_nothing_is_not_a_silent_success(optimizer):
    # Bars times 100 with a guide whose posteriors start at scale 0.1 whatever the data and that fit does not
    # rescale (its built-in guides train in standard units, tests/test_units.py): the codes stay near 0 and
    # sigma^2 at the data's variance. The run may reach its steps without an error, not without a word.
    x = bars(200, noise=0.1, seed=0)[0] * 100
    with pyro.get_param_store().scope():
        model = SparseCoding(25, 10)
        with pytest.warns(ConvergenceWarning, match="explains none of the data's variance.*standardise"):
            fit(model, OwnAutoNormal(model, create_plates=model.create_plates), x, optimizer=optimizer,
                batch_size=50, steps=50, progress=False)


def test_a_stall_is_never_converged_and_warns():
    # Posteriors started 1e-4 wide (a thousandth of the data's scale): L-BFGS stalls within 10 steps.
    x = bars(200, noise=0.1, seed=0)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(25, 10)
        with pytest.warns(ConvergenceWarning, match="stalled at step .* not a confirmed optimum") as caught:
            history = fit(model, LocalMultivariateNormal(model, init_scale=1e-4), x, progress=False)
    assert not history.converged and history.stop_reason.startswith("stalled")
    # The warning names the caller's line, not the library's.
    assert all(warning.filename == __file__ for warning in caught)


# ---------------------------------------------------------------------------------------------- resume

class Interrupted(Exception):
    pass


ROUTES = [
    ("lbfgs", LocalMultivariateNormal, {}),
    ("lbfgs", LocalMultivariateNormal, {"scale": 255.0}),  # trains in units of 128 (pyro_esc.standard_units)
    ("lbfgs", amortized, {}),
    ("svi", amortized, {"lr": 0.05}),
    ("svi", autonormal, {"lr": 0.05, "lr_schedule": "cosine", "batch_size": 20}),
    ("svi", amortized, {"lr": 0.05, "lr_schedule": "cosine", "batch_size": 20}),
    ("rowwise", LocalMultivariateNormal, {"lr": 0.05, "lr_schedule": "exponential", "batch_size": 20}),
    ("em", autonormal, {"batch_size": 20}),
    # The gradient routes in standard units: an encoder's unit, per-point rows on minibatches.
    ("svi", amortized, {"lr": 0.05, "scale": 255.0}),
    ("rowwise", LocalMultivariateNormal, {"lr": 0.05, "batch_size": 20, "scale": 1e-3}),
]


def train(make_guide, optimizer, options, path=None, resume=None, stop_at=None):
    def callback(step, history):
        if step == stop_at:
            raise Interrupted
    options = dict(options)
    x = bars(60, side=3, noise=0.1, seed=0)[0] * options.pop("scale", 1.0)
    with pyro.get_param_store().scope():
        pyro.set_rng_seed(0)  # the encoder's initial weights
        model = SparseCoding(9, 6)
        guide = make_guide(model)
        try:
            history = fit(model, guide, x, optimizer=optimizer, steps=12, tol=None, seed=3, progress=False,
                          checkpoint=path, checkpoint_every=None if path is None else 5, resume=resume,
                          callback=callback, **options)
        except Interrupted:
            return None, None
        own = [tensor.detach().clone() for module in (model, guide) for tensor in module.parameters()]
        stored = {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}
        return history, (own, stored)


@pytest.mark.parametrize("optimizer, make_guide, options", ROUTES)
def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, optimizer, make_guide, options):
    straight, (own, stored) = train(make_guide, optimizer, options)
    path = str(tmp_path / "run.pt")
    train(make_guide, optimizer, options, path=path, stop_at=7)
    resumed, (own_resumed, stored_resumed) = train(make_guide, optimizer, options, path=path, resume=path)
    assert resumed.loss == straight.loss and resumed.unit == straight.unit
    # The module computes with the tensors the optimiser trains (the store's), and they are the straight run's.
    assert all(torch.equal(a, b) for a, b in zip(own, own_resumed))
    assert stored.keys() == stored_resumed.keys()
    assert all(torch.equal(stored[name], stored_resumed[name]) for name in stored)


def test_an_interrupted_run_in_standard_units_leaves_the_model_in_the_datas_units():
    x = bars(60, side=3, noise=0.1, seed=0)[0] * 255
    seen = []

    def callback(step, history):
        seen.append(history.elbo[-1])
        if step == 6:
            raise Interrupted
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6)
        guide = LocalMultivariateNormal(model)
        with pytest.raises(Interrupted):
            fit(model, guide, x, callback=callback, progress=False)
        # The History a callback sees is in the data's units, and so are model and guide after the exception.
        assert training_elbo(model, guide, x) == pytest.approx(seen[-1], abs=1e-3)
        assert held_out_elbo(model, guide, x) == pytest.approx(seen[-1], abs=1e-3)


# ---------------------------------------------------------------------------------------------- evaluation

def test_evaluation_reads_the_model_it_is_given_in_any_scope():
    x = bars(40, side=3, noise=0.1, seed=0)[0]
    a = SparseCoding(9, 6, name="same")
    with pyro.get_param_store().scope():
        a_guide = amortized(a)
        fit(a, a_guide, x, steps=30, tol=None, optimizer="svi", lr=0.05, progress=False)
    a_values = [tensor.detach().clone() for tensor in a.parameters()]
    expected = held_out_elbo(a, a_guide, x)
    with pyro.get_param_store().scope():
        # Model B has A's names: inside B's scope, A used to read (and keep) B's tensors.
        b = SparseCoding(9, 6, name="same")
        b_guide = amortized(b)
        fit(b, b_guide, x * 3, steps=5, tol=None, optimizer="svi", lr=0.05, progress=False)
        assert held_out_elbo(a, a_guide, x) == expected
        assert training_elbo(a, a_guide, x) == pytest.approx(training_elbo(a, a_guide, x))
        assert held_out_elbo(b, b_guide, x * 3) != expected
    assert all(torch.equal(before, after) for before, after in zip(a_values, a.parameters()))


def test_a_per_point_guide_is_not_evaluated_on_other_data():
    x = bars(40, side=3, noise=0.1, seed=0)[0]
    other = bars(40, side=3, noise=0.1, seed=1)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6)
        guide = LocalMultivariateNormal(model)
        fit(model, guide, x, steps=20, progress=False)
        for evaluate in (held_out_elbo, training_elbo):
            assert math.isfinite(evaluate(model, guide, x))
            with pytest.raises(ValueError, match="holds posteriors for the 40 points it was fitted to.*encode"):
                evaluate(model, guide, other)
        with pytest.raises(ValueError, match="guide must be the trained guide"):
            held_out_elbo(model, None, x)


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("options, message", [
    ({"seed": None}, "seed must be an integer >= 0"),
    ({"dtype": torch.int32}, "dtype must be torch.float32 or torch.float64"),
    ({"dtype": torch.bfloat16}, "dtype must be torch.float32 or torch.float64"),
    ({"dtype": torch.float16}, "dtype must be torch.float32 or torch.float64"),
    ({"device": "meta"}, "device='meta' holds no values"),
    ({"device": "no-such-device"}, "device must be a torch device"),
])
def test_bad_options_are_clear_errors_before_training(options, message):
    x = bars(30, side=3, seed=0)[0].numpy()
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6)
        with pytest.raises(ValueError, match=message):
            fit(model, LocalMultivariateNormal(model), x, steps=3, progress=False, **options)


@pytest.mark.parametrize("schedule", [lambda t: float("nan"), lambda t: -1.0, lambda t: "fast",
                                      lambda t: 1.0 if t < 0.5 else float("inf")])
def test_a_learning_rate_schedule_must_give_factors(schedule):
    x = bars(60, side=3, seed=0)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6)
        with pytest.raises(ValueError, match="lr_schedule returned .* at progress"):
            fit(model, autonormal(model), x, batch_size=20, optimizer="svi", lr_schedule=schedule, steps=5,
                progress=False)


def test_a_schedule_may_decay_to_zero():
    x = bars(60, side=3, seed=0)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6)
        history = fit(model, autonormal(model), x, batch_size=20, optimizer="svi", lr_schedule=lambda t: 1 - t,
                      steps=5, progress=False)
    assert history.lr[-1] == 0.0


@pytest.mark.parametrize("data, message", [
    (lambda x: x.half(), "dtype torch.float16, which resolves too few digits"),
    (lambda x: x.to(torch.bfloat16), "dtype torch.bfloat16, which resolves too few digits"),
    (lambda x: x * 1e30, "too large for torch.float32.*Divide it by a constant"),
    (lambda x: x * 1e-30, "too small for torch.float32.*Multiply it by a constant"),
    (lambda x: x.double() * 1e200, "too large for torch.float64"),
])
def test_data_the_objective_cannot_resolve_is_refused(data, message):
    x = bars(30, side=3, seed=0)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6)
        with pytest.raises(ValueError, match=message):
            fit(model, LocalMultivariateNormal(model), data(x), steps=3, progress=False)


def test_the_same_extremes_are_fine_in_float64():
    x = bars(30, side=3, noise=0.1, seed=0)[0].double() * 1e-30
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6).double()
        assert math.isfinite(fit(model, LocalMultivariateNormal(model), x, steps=3, progress=False).final_elbo)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    x = bars(30, side=3, seed=0)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6)
        with pytest.raises(ValueError, match="no CUDA device"):
            fit(model, LocalMultivariateNormal(model), x, device="cuda", progress=False)


def test_denoising_a_constant_image_says_why_not():
    with pytest.raises(ValueError, match="image is constant"):
        denoise(np.full((16, 16), 0.5), patch_size=4)


# ---------------------------------------------------------------------------------------------- command line

def usage_error(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_command_line_checks_paths_and_device_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    usage_error(["bars", "--out", str(blocker / "sub"), "--quiet"], capsys, "--out: cannot create the folder")
    usage_error(["denoise", str(tmp_path / "missing.png"), str(tmp_path / "out.png")], capsys,
                "input: no such file")
    image = tmp_path / "in.png"
    from PIL import Image
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
    usage_error(["denoise", str(image), str(tmp_path / "out.png"), "--dictionary", str(tmp_path / "none.pt")],
                capsys, "--dictionary: no such file")
    usage_error(["denoise", str(image), str(blocker / "out.png")], capsys, "output: cannot create the folder")
    usage_error(["patches", "--epochs", "1", "--steps", "5", "--out", str(tmp_path), "--quiet"], capsys,
                "pass --steps or --epochs, not both")
    if not torch.cuda.is_available():
        usage_error(["bars", "--device", "cuda", "--out", str(tmp_path), "--quiet"], capsys, "no CUDA device")
    assert not os.path.exists(tmp_path / "bars_metrics.json")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_out_folder_is_a_usage_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        usage_error(["bars", "--out", str(locked), "--quiet"], capsys, "--out: cannot write into")
    finally:
        locked.chmod(0o700)


def test_a_saved_model_denoises_through_the_command_line(tmp_path, capsys):
    # The pre-flight checks accept what is there: a saved model and a readable image.
    x = bars(50, side=4, noise=0.1, seed=0)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(16, 8)
        fit(model, LocalMultivariateNormal(model), x, steps=20, progress=False)
        save(str(tmp_path / "model.pt"), model)
    from PIL import Image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(tmp_path / "in.png")
    assert main(["denoise", str(tmp_path / "in.png"), str(tmp_path / "out" / "d.png"), "--patch-size", "4",
                 "--dictionary", str(tmp_path / "model.pt")]) == 0
    assert (tmp_path / "out" / "d.png").exists()
