"""fit: history, minibatches, schedules, checkpoints that resume bit-for-bit, non-finite stops."""

import math

import numpy as np
import pytest
import torch

import pyro
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_esc import AnalyticELBO, EntropyELBO, NonFiniteObjectiveError, SparseCoding
from pyro_esc.annealing import Annealing, linear
from pyro_esc.data import bars
from pyro_esc.training import fit, load_checkpoint


def problem(num=60, side=3):
    x, true = bars(num, side=side, seed=2)
    model = SparseCoding(x.size(1), 2 * side)
    return model, AutoNormal(model, create_plates=model.create_plates), x


def test_history_records_every_step_and_the_objective_improves():
    model, guide, x = problem()
    history = fit(model, guide, x, steps=60, lr=0.05, progress=False)
    assert history.step == list(range(1, 61)) and len(history) == 60
    assert history.num_data == 60
    assert all(math.isclose(e, -l / 60) for e, l in zip(history.elbo, history.loss))
    assert history.elbo[-1] > history.elbo[0] + 0.1
    assert all(b >= a for a, b in zip(history.wall_time, history.wall_time[1:]))
    assert len(history.prior_scale[-1]) == 6 and history.noise_var[-1] > 0
    # The recorded scales are the ones EntropyELBO wrote: Theorem 2 for the guide before the last step.
    assert history.betas[-1] == [1.0, 1.0, 1.0]


def test_epochs_and_minibatches_count_steps_and_cover_the_data():
    model, guide, x = problem(num=50)
    seen = []
    history = fit(model, guide, x, epochs=3, batch_size=20, progress=False,
                  callback=lambda step, history: seen.append(step))
    assert history.step[-1] == 9 and history.epoch[-1] == 3.0  # ceil(50 / 20) = 3 steps per epoch
    assert seen == list(range(1, 10))


def test_record_every_and_trace_elbo_monitoring(float64):
    model, guide, x = problem()
    history = fit(model, guide, x.double(), steps=30, record_every=10, trace_elbo_every=15,
                  trace_elbo_particles=400, progress=False)
    assert history.step == [10, 20, 30]
    assert history.trace_elbo_step == [30]
    # At lambda*, sigma^2* Pyro's Monte Carlo ELBO estimates the same number as L_H
    # (evaluated one optimiser step later, hence the loose tolerance).
    assert abs(history.trace_elbo[-1] - history.elbo[-1]) < 0.05 * abs(history.elbo[-1])


def test_learning_rate_schedule_is_applied():
    model, guide, x = problem()
    history = fit(model, guide, x, steps=11, lr=0.1, lr_schedule="cosine", progress=False)
    assert math.isclose(history.lr[0], 0.1) and math.isclose(history.lr[-1], 0.01)
    assert all(b <= a + 1e-12 for a, b in zip(history.lr, history.lr[1:]))


def test_arrays_are_accepted_and_converted_to_the_default_dtype():
    model, guide, x = problem()
    fit(model, guide, x.double().numpy(), steps=2, progress=False)
    assert model.dictionary.dtype == torch.float32


class Interrupted(Exception):
    pass


def train(path=None, resume=None, steps=12, loss=None, batch_size=None, checkpoint_every=None, stop_at=None):
    def callback(step, history):
        if step == stop_at:
            raise Interrupted
    pyro.clear_param_store()
    model, guide, x = problem()
    try:
        history = fit(model, guide, x, loss=loss, steps=steps, batch_size=batch_size, seed=3, progress=False,
                      checkpoint=path, checkpoint_every=checkpoint_every, resume=resume, callback=callback)
    except Interrupted:
        return None, None
    params = {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}
    return params, history


@pytest.mark.parametrize("make_loss, batch_size", [
    (EntropyELBO, None),
    (EntropyELBO, 25),
    (lambda: EntropyELBO(annealing=Annealing(8, posterior=linear(2.0))), 25),
    (AnalyticELBO, 25),
    (Trace_ELBO, 25),
])
def test_checkpoints_resume_bit_for_bit(tmp_path, make_loss, batch_size):
    straight, straight_history = train(steps=12, loss=make_loss(), batch_size=batch_size)
    path = str(tmp_path / "run.pt")
    # Interrupted after step 6, with the last checkpoint at step 5.
    train(path, steps=12, loss=make_loss(), batch_size=batch_size, checkpoint_every=5, stop_at=6)
    assert load_checkpoint(path)["step"] == 5
    resumed, resumed_history = train(path, resume=path, steps=12, loss=make_loss(), batch_size=batch_size)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert straight_history.loss == resumed_history.loss
    assert straight_history.betas == resumed_history.betas


def test_periodic_checkpoints_are_written(tmp_path):
    path = str(tmp_path / "sub" / "run.pt")
    train(path, steps=7, checkpoint_every=3)
    assert load_checkpoint(path)["step"] == 7


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        train(resume=str(path))
    torch.save({"something": 1}, str(path))
    with pytest.raises(ValueError, match="not a pyro_esc checkpoint"):
        train(resume=str(path))
    with pytest.raises(ValueError, match="does not exist"):
        train(resume=str(tmp_path / "missing.pt"))


def poison_scales_after(step_to_poison):
    def callback(step, history):
        if step == step_to_poison:
            with torch.no_grad():
                pyro.param("AutoNormal.scales.z").unconstrained()[0, 0] = float("nan")
    return callback


def test_non_finite_entropy_objective_stops_with_step_and_term():
    model, guide, x = problem()
    with pytest.raises(NonFiniteObjectiveError, match=r"step 3: EntropyELBO is not finite: term\(s\) posterior_entropy"):
        fit(model, guide, x, steps=10, progress=False, callback=poison_scales_after(2))


def test_non_finite_sampled_objective_stops_with_step_and_site():
    model, guide, x = problem()
    with pytest.raises(NonFiniteObjectiveError, match="step 3: Trace_ELBO .*AutoNormal.scales.z"):
        fit(model, guide, x, loss=Trace_ELBO(), steps=10, progress=False, callback=poison_scales_after(2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=3, epochs=2), "steps or epochs"),
    (dict(steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=-1.0), "lr"),
    (dict(lr_schedule="sideways"), "lr_schedule"),
    (dict(record_every=0), "record_every"),
    (dict(trace_elbo_every=0), "trace_elbo_every"),
    (dict(checkpoint_every=5), "checkpoint path"),
    (dict(loss="elbo"), "pyro.infer.ELBO"),
    (dict(optim="adam"), "PyroOptim"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    model, guide, x = problem()
    with pytest.raises(ValueError, match=message):
        fit(model, guide, x, progress=False, **kwargs)


def test_bad_data_is_a_clear_error():
    model, guide, x = problem()
    with pytest.raises(ValueError, match="data must be finite"):
        fit(model, guide, np.full((10, 9), np.nan), progress=False)


def test_sampled_objectives_with_minibatches_need_shared_plates():
    x, _ = bars(40, side=3)
    model = SparseCoding(9, 6)
    with pytest.raises(ValueError, match="create_plates=model.create_plates"):
        fit(model, AutoNormal(model), x, loss=Trace_ELBO(), batch_size=10, progress=False)


def test_annealing_through_fit_is_logged_and_ends_at_the_true_objective():
    model, guide, x = problem()
    history = fit(model, guide, x, steps=10, annealing="default", progress=False)
    assert history.betas[0] == [2.0, 1.0, 1.0]
    assert history.betas[-1] == [1.0, 1.0, 1.0]  # the default anneals over the first half
    with pytest.raises(ValueError, match="annealing weights the entropy terms"):
        fit(model, guide, x, loss=AnalyticELBO(), steps=2, annealing="default", progress=False)
    loss = EntropyELBO()
    with pytest.raises(ValueError, match="annealing must be"):
        fit(model, guide, x, loss=loss, steps=2, annealing="fast", progress=False)
    assert loss.annealing is None  # a rejected argument leaves the loss as it was
    annealed = EntropyELBO(annealing=Annealing(4, posterior=linear(2.0)))
    with pytest.raises(ValueError, match="already anneals"):
        fit(model, guide, x, loss=annealed, steps=2, annealing="default", progress=False)


def test_the_progress_bar_promises_no_time_it_cannot_know(capsys):
    # fit's bar used to estimate the time left against the 20,000-step limit (7:27:19 at step 1) while L-BFGS
    # converged in hundreds, and a second bar restarted at 0 % for the float64 phase.
    from pyro_esc import LocalMultivariateNormal, fit
    from pyro_esc.train.loop import _bar_extent
    from pyro_esc.train.options import check_fit_options

    x = bars(60, side=3, noise=0.1, seed=0)[0]
    with pyro.get_param_store().scope():
        model = SparseCoding(9, 6)
        guide = LocalMultivariateNormal(model)
        arguments = dict(loss=None, optimizer="auto", steps=None, epochs=None, batch_size=None, lr=None,
                         lr_schedule=None, optim=None, seed=0, record_every=1, eval_every=None, trace_elbo_every=None,
                         trace_elbo_particles=16, checkpoint=None, checkpoint_every=None, resume=None, annealing=None,
                         tol="auto", gtol="auto", window=20, n_init=1, train_dictionary=True, inner_steps=None,
                         train_model=True, finish_in_float64=True)
        converging = check_fit_options(model, guide, x, **arguments)
        fixed = check_fit_options(model, guide, x, **dict(arguments, steps=40, tol=None))
    assert _bar_extent(converging, 0, None) == {"total": None, "initial": 0, "desc": "fit"}
    assert _bar_extent(fixed, 0, None)["total"] == 40
    assert _bar_extent(converging, 542, object()) == {"total": None, "initial": 542, "desc": "fit, in float64"}
    for options in (dict(steps=5, tol=None), dict(steps=3)):
        with pyro.get_param_store().scope():
            model = SparseCoding(9, 6)
            fit(model, LocalMultivariateNormal(model), x, progress=True, **options)
    shown = capsys.readouterr().err
    assert "fit: 100%" in shown and "5/5" in shown  # a fixed budget: its fraction and the time left
    assert "3it" in shown and "3/20000" not in shown  # a convergence test: steps and rate, no made-up total
