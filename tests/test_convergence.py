"""fit's deterministic route: L-BFGS on the exact objective, convergence, restarts, the reference ELBO."""

import functools

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam

from pyro_esc import (EntropyELBO, GaussianPosterior, LocalMultivariateNormal, SparseCoding, fit, reference_elbo,
                      training_elbo)
from pyro_esc.convergence import Convergence
from pyro_esc.data import bars
from pyro_esc.experiments import run_bars
from pyro_esc.training import ConvergenceWarning, decaying_adam


def small_problem(num=40, side=3, seed=1, dtype=torch.float64, n_latents=3):
    # Fewer latents than bars: an optimum without the flat directions of unused latents, so that
    # L-BFGS converges in a few hundred steps.
    x, true = bars(num, side=side, seed=seed, dtype=dtype)
    model = SparseCoding(x.size(1), n_latents)
    return model, AutoNormal(model, create_plates=model.create_plates), x, true


def test_the_convergence_test_on_a_known_sequence():
    # An independent route: a geometric sequence f_t = -1 - 2^-t, whose change over a window is known.
    convergence = Convergence(tol=1e-3, window=5)
    steps = [t for t in range(1, 40) if convergence.update(-1 - 2.0 ** -t)]
    # |f_t - f_{t-5}| = 2^-t (2^5 - 1) <= 1e-3 * |f_t| first holds at t = 15.
    assert steps[0] == 15 and "relative change" in convergence.reason
    with_gradient = Convergence(tol=1.0, gtol=1e-2, window=1)
    assert not with_gradient.update(1.0, grad_norm=1.0) and not with_gradient.update(1.0, grad_norm=0.5)
    assert with_gradient.update(1.0, grad_norm=1e-3)
    for bad in (dict(tol=-1.0, gtol=None, window=3), dict(tol=1e-3, gtol=float("nan"), window=3),
                dict(tol=1e-3, gtol=None, window=0)):
        with pytest.raises(ValueError, match=next(iter(k for k, v in bad.items() if v in (-1.0, 0) or v != v))):
            Convergence.check(**bad)


def test_fit_defaults_to_lbfgs_and_says_so_and_how_it_ended():
    model, guide, x, _ = small_problem()
    history = fit(model, guide, x, progress=False)
    # The route under the name fit(optimizer=...) takes (it said "torch" for the default "lbfgs").
    assert history.route == "lbfgs" and history.optimizer == "LBFGS"
    assert fit(model, guide, x, optimizer="lbfgs", steps=2, tol=None, progress=False).route == "lbfgs"
    assert history.converged and history.stop_reason.startswith("converged")
    # Its repr is the run in one line, not every per-step list.
    text = repr(history)
    assert text.startswith("History(route='lbfgs', optimizer='LBFGS', steps=") and "converged=True" in text
    assert "[" not in text and len(text) < 300
    assert history.step[-1] < 5000 and history.evaluations >= history.step[-1]
    assert len(history.grad_norm) == len(history.step) and history.grad_norm[-1] >= 0
    assert history.final_elbo == pytest.approx(training_elbo(model, guide, x), rel=1e-10)
    # SVI settings choose the SVI route.
    pyro.clear_param_store()
    model, guide, x, _ = small_problem()
    assert fit(model, guide, x, steps=3, lr=0.01, progress=False).route == "svi"


def test_a_run_that_hits_its_step_limit_says_it_is_unconverged():
    model, guide, x, _ = small_problem()
    with pytest.warns(ConvergenceWarning, match="unconverged"):
        history = fit(model, guide, x, steps=5, progress=False)
    assert not history.converged and "step limit: 5 steps" in history.stop_reason and history.step[-1] == 5


def test_lbfgs_and_svi_reach_the_same_optimum_from_the_same_start(float64):
    # Three latents for 3x3 bars: an optimum without the flat directions of unused latents.
    def train(**options):
        pyro.clear_param_store()
        x, _ = bars(100, side=3, seed=1, dtype=torch.float64)
        model = SparseCoding(x.size(1), 3)
        guide = AutoNormal(model, create_plates=model.create_plates)
        return fit(model, guide, x, seed=0, progress=False, **options)

    lbfgs = train(optimizer="lbfgs", tol=1e-10, steps=3000)
    svi = train(optimizer="svi", steps=4000, optim=decaying_adam(0.03, 4000, decay_to=0.02))
    assert lbfgs.converged and lbfgs.step[-1] < 1000
    assert abs(lbfgs.final_elbo - svi.final_elbo) < 1e-4


def test_any_torch_optimizer_class_or_factory_takes_the_torch_route():
    model, guide, x, _ = small_problem()
    first = EntropyELBO().loss(model, guide, x)
    history = fit(model, guide, x, optimizer=functools.partial(torch.optim.Adam, lr=0.05), steps=40, tol=None,
                  progress=False)
    assert history.route == "torch" and history.optimizer == "Adam"
    assert -history.final_elbo * x.size(0) < first
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fit(model, guide, x, optimizer="newton", progress=False)
    with pytest.raises(ValueError, match="needs the full data set"):
        fit(model, guide, x, optimizer="lbfgs", batch_size=10, progress=False)
    with pytest.raises(ValueError, match="is for the SVI route"):
        fit(model, guide, x, optimizer=torch.optim.SGD, optim=pyro.optim.Adam({"lr": 0.1}), progress=False)


def test_restarts_keep_the_best_run_and_record_every_run():
    model, guide, x, _ = small_problem(num=60, side=3, seed=2, n_latents=6)
    history = fit(model, guide, x, n_init=3, tol=1e-5, progress=False)
    assert len(history.restart_elbos) == 3
    assert len(set(round(value, 6) for value in history.restart_elbos)) > 1  # the initialisations differ
    assert history.best_restart == max(range(3), key=history.restart_elbos.__getitem__)
    # What is left in the model and guide is the best run: re-evaluated independently.
    assert training_elbo(model, guide, x) == pytest.approx(max(history.restart_elbos), rel=1e-10)
    assert history.final_elbo == pytest.approx(max(history.restart_elbos), rel=1e-12)


class UndecoratedGuide(PyroModule):
    """A PyroModule guide whose protocol method lacks @pyro_method (the context trap)."""

    def __init__(self, num_data, n_latents):
        super().__init__(name="UndecoratedGuide")
        self.loc = PyroParam(0.1 * torch.randn(num_data, n_latents), event_dim=1)
        self.scale = PyroParam(torch.full((num_data, n_latents), 0.2), dist.constraints.positive, event_dim=1)

    def forward(self, x, subsample=None):
        with pyro.plate("data", x.size(0), subsample=subsample):
            return pyro.sample("z", dist.Normal(self.loc, self.scale).to_event(1))

    def gaussian_posterior(self, x, subsample=None):
        rows = slice(None) if subsample is None else subsample
        return GaussianPosterior.from_scale(self.loc[rows], self.scale[rows])


def test_the_lbfgs_route_trains_every_guide_parameter():
    x, _ = bars(40, side=3, seed=1)
    model = SparseCoding(9, 6)
    guide = UndecoratedGuide(40, 6)
    before = {name: value.detach().clone() for name, value in guide.named_parameters()}
    fit(model, guide, x, steps=5, tol=None, progress=False)
    for name, value in guide.named_parameters():
        assert not torch.equal(before[name], value.detach()), f"{name} did not move"

    class PlainGuide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Parameter(torch.zeros(40, 6))

        def forward(self, x, subsample=None):
            with pyro.plate("data", x.size(0)):
                return pyro.sample("z", dist.Normal(self.loc, 0.1).to_event(1))

        def gaussian_posterior(self, x, subsample=None):
            return GaussianPosterior.from_scale(self.loc, torch.tensor(0.1))

    pyro.clear_param_store()  # a new model of the same parameter names
    with pytest.raises(ValueError, match="never"):
        fit(SparseCoding(9, 6), PlainGuide(), x, steps=2, progress=False)


def test_the_reference_elbo_holds_the_dictionary_and_leaves_the_caller_alone(float64):
    x, true = bars(60, side=3, seed=5, dtype=torch.float64)
    pyro.set_rng_seed(11)
    before_rng = torch.rand(1)
    pyro.set_rng_seed(11)
    full = reference_elbo(x, true, tol=1e-9)
    diagonal = reference_elbo(x, true, guide="local-diag", tol=1e-9)
    assert torch.rand(1) == before_rng  # the caller's random stream is where it was
    assert len(pyro.get_param_store()) == 0  # and its param store untouched
    assert full >= diagonal - 1e-6  # the full-covariance family contains the diagonal one
    # Held fixed means held fixed: the same fit, with the dictionary free, goes higher still.
    model = SparseCoding(x.size(1), true.size(1))
    model.set_dictionary(true)
    guide = LocalMultivariateNormal(model)
    history = fit(model, guide, x, train_dictionary=False, tol=1e-9, progress=False)
    assert torch.allclose(model.dictionary.detach(), true / true.norm(dim=0))
    assert history.final_elbo == pytest.approx(full, abs=1e-5)
    assert fit(model, guide, x, tol=1e-9, progress=False).final_elbo > full


@pytest.mark.slow
def test_the_papers_bars_setting_finds_every_bar_with_the_defaults():
    # 5x5 bars, Laplace(1) amplitudes, sigma = 0.1, N = 1000 (`pyro-esc bars --noise 0.1`).
    result = run_bars(noise=0.1, seed=0, progress=False, reference=False)
    assert result.all_bars_found and result.n_init == 1
    assert result.converged  # where float32 stalled, float64 took over until the convergence test held


def test_restarts_on_the_svi_route_and_with_an_amortised_guide():
    from pyro_esc import AmortizedNormal

    x, _ = bars(40, side=3, seed=1)
    model = SparseCoding(x.size(1), 6)
    guide = AmortizedNormal(x.size(1), 6, hidden=(8,))
    history = fit(model, guide, x, optimizer="svi", steps=15, n_init=2, progress=False)
    assert history.route == "svi" and len(history.restart_elbos) == 2
    assert training_elbo(model, guide, x) == pytest.approx(max(history.restart_elbos), rel=1e-6)
    with pytest.raises(ValueError, match="cannot be combined with checkpoint"):
        fit(model, guide, x, steps=2, n_init=2, checkpoint="run.pt", progress=False)


def test_lbfgs_steps_reuse_the_evaluation_they_end_on_for_the_scales(float64, monkeypatch):
    """The post-step update reads the terms L-BFGS evaluated last instead of evaluating again, and the
    scales it writes equal a fresh evaluation's."""
    from pyro_esc import EntropyELBO, LocalMultivariateNormal, SparseCoding, fit
    from pyro_esc.data import bars

    x = bars(120, side=3, noise=0.3, seed=0)[0].double()
    model = SparseCoding(9, 6)
    guide = LocalMultivariateNormal(model)
    fresh_updates = []
    original = EntropyELBO.update
    monkeypatch.setattr(EntropyELBO, "update",
                        lambda self, *args, **kwargs: fresh_updates.append(1) or original(self, *args, **kwargs))
    loss = EntropyELBO()
    history = fit(model, guide, x, loss=loss, steps=40, tol=None, progress=False)
    assert history.step[-1] == 40 and len(fresh_updates) < 10  # nearly every step reused its last evaluation
    written = (model.prior_scale.detach().clone(), model.noise_var.detach().clone())
    terms = loss.terms(model, guide, x)
    assert torch.allclose(written[0], terms.prior_scale, rtol=1e-12) and torch.allclose(written[1], terms.noise_var,
                                                                                         rtol=1e-12)
    assert history.elbo[-1] == pytest.approx(float(terms.elbo), rel=1e-12)


def stalling_problem():
    # 3x3 bars at noise 0.05 in float32 with 3 latents: L-BFGS stalls on float32's resolution after
    # about 160 steps, still short of the optimum.
    pyro.clear_param_store()
    torch.manual_seed(0)
    x, _ = bars(40, side=3, noise=0.05, seed=1)
    model = SparseCoding(x.size(1), 3)
    return model, LocalMultivariateNormal(model), x


def test_a_float32_run_that_stalls_goes_on_in_float64_and_returns_in_float32():
    model, guide, x = stalling_problem()
    stopped = fit(model, guide, x, finish_in_float64=False, progress=False)
    assert stopped.stop_reason.startswith("stalled") and "float32" in stopped.stop_reason
    assert stopped.finish_step is None and not stopped.converged

    model, guide, x = stalling_problem()
    history = fit(model, guide, x, progress=False)
    # The same trajectory up to the stall, then float64 until the convergence test holds.
    assert history.finish_step == stopped.step[-1] < history.step[-1]
    assert history.elbo[:len(stopped.elbo)] == stopped.elbo
    assert history.converged and f"in float64 from step {stopped.step[-1]}" in history.stop_reason
    assert history.evaluations > stopped.evaluations
    # The caller's dtype is kept, and the ELBO reported is that of the float32 parameters returned ...
    assert all(p.dtype == torch.float32 for module in (model, guide) for p in module.parameters())
    assert history.final_elbo == pytest.approx(training_elbo(model, guide, x), abs=1e-6)
    # ... which, evaluated independently in float64, is above where float32 stalled.
    assert training_elbo(model.double(), guide.double(), x.double()) > stopped.final_elbo + 1e-6


def test_the_float64_finish_is_skipped_where_it_cannot_apply(tmp_path):
    model, guide, x = stalling_problem()
    history = fit(model, guide, x, checkpoint=str(tmp_path / "run.pt"), progress=False)
    assert history.finish_step is None and history.stop_reason.startswith("stalled")
    model, guide, x = stalling_problem()
    with pytest.warns(ConvergenceWarning):
        history = fit(model, guide, x, steps=3, progress=False)  # ends on its step limit: nothing to finish
    assert history.finish_step is None
    with pytest.raises(ValueError, match="finish_in_float64"):
        fit(model, guide, x, finish_in_float64="yes", progress=False)


@pytest.mark.parametrize("kind", ["auto-normal", "auto-mvn", "amortized"])
def test_the_float64_finish_converts_every_kind_of_guide_and_back(kind):
    from pyro.infer.autoguide import AutoMultivariateNormal

    from pyro_esc import AmortizedNormal

    model, _, x = stalling_problem()
    guide = {"auto-normal": lambda: AutoNormal(model, create_plates=model.create_plates),
             "auto-mvn": lambda: AutoMultivariateNormal(model),
             "amortized": lambda: AmortizedNormal(x.size(1), 3, hidden=(8,))}[kind]()
    history = fit(model, guide, x, progress=False)
    assert history.finish_step is not None and history.converged
    assert {p.dtype for module in (model, guide) for p in module.parameters()} == {torch.float32}
    assert history.final_elbo == pytest.approx(training_elbo(model, guide, x), abs=1e-6)
