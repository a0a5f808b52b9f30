"""The row-wise minibatch route: O(batch) steps, checked against dense references.

- the objective and its gradients with the batch's rows handed over as an argument
  (a posterior built from them) equal those of the ordinary (dense, param-store) read;
- several row-wise steps equal a hand-written reference: gradients from the dense
  read, Adam kept per data point in plain Python;
- a step reads no per-point parameter through the param store and leaves the
  rows outside the batch bit-for-bit alone;
- running totals stay exact over 10,000 incremental updates.
"""

import math

import pytest
import torch

import pyro
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_esc import AmortizedNormal, AnalyticELBO, EntropyELBO, LocalMultivariateNormal, SparseCoding, fit
from pyro_esc.data import bars
from pyro_esc.rows import per_point_parameters, rows_posterior
from pyro_esc.statistics import PointStatistics, RunningStatistics

GUIDE_MAKERS = {
    "autonormal": lambda model: AutoNormal(model, create_plates=model.create_plates),
    "local-full": LocalMultivariateNormal,
}


def problem(guide_name, n=12, side=3, seed=0):
    x = bars(n, side=side, noise=0.3, seed=seed)[0].to(torch.get_default_dtype())
    model = SparseCoding(x.size(1), 2 * side)
    guide = GUIDE_MAKERS[guide_name](model)
    guide(x)  # create the parameters
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move away from the symmetric initialisation
        for name, value in pyro.get_param_store().named_parameters():
            value.add_(0.3 * torch.randn(value.shape, generator=generator, dtype=value.dtype))
    return model, guide, x


def constrained_rows(guide, subsample):
    """Leaves holding the batch's rows of each per-point parameter (unconstrained), and the posterior built from
    them, constrained, as the row-wise step builds it."""
    store = pyro.get_param_store()
    leaves, rows = {}, []
    for parameter in per_point_parameters(guide):
        leaf = store._params[parameter.name].detach().index_select(0, subsample).requires_grad_()
        leaves[parameter.name] = leaf
        rows.append(torch.distributions.transform_to(parameter.constraint)(leaf))
    return leaves, rows_posterior(guide, rows)


def optimised(loss, model, guide, x, subsample, statistics, posterior=None):
    if isinstance(loss, EntropyELBO):
        return loss.evaluate(model, guide, x, subsample, statistics, posterior=posterior).optimised
    return loss.evaluate(model, guide, x, subsample, posterior=posterior)


@pytest.mark.parametrize("guide_name", sorted(GUIDE_MAKERS))
@pytest.mark.parametrize("make_loss", [EntropyELBO, AnalyticELBO])
def test_rows_given_as_an_argument_give_the_dense_read_value_and_gradients(float64, guide_name, make_loss):
    model, guide, x = problem(guide_name)
    loss = make_loss()
    subsample = torch.tensor([7, 2, 9, 4])
    statistics = None
    if isinstance(loss, EntropyELBO):
        statistics = loss.init_statistics(model, guide, x)
        with torch.no_grad():
            pyro.get_param_store()[per_point_parameters(guide)[0].name].add_(0.1)  # make the table stale
        loss.commit(model, guide, x, torch.tensor([0, 1, 2]), statistics)  # and three rows fresh
    store = pyro.get_param_store()
    dense = optimised(loss, model, guide, x, subsample, statistics)
    names = [parameter.name for parameter in per_point_parameters(guide)]
    dense_grads = torch.autograd.grad(dense, [store._params[name] for name in names])
    leaves, posterior = constrained_rows(guide, subsample)
    substituted = optimised(loss, model, guide, x, subsample, statistics, posterior)
    row_grads = torch.autograd.grad(substituted, [leaves[name] for name in names])
    assert torch.allclose(substituted, dense, rtol=1e-12, atol=1e-12)
    for name, dense_grad, row_grad in zip(names, dense_grads, row_grads):
        assert torch.allclose(row_grad, dense_grad.index_select(0, subsample), rtol=1e-10, atol=1e-12), name
        others = torch.ones(x.size(0), dtype=torch.bool)
        others[subsample] = False
        assert dense_grad[others].abs().max() == 0  # the dense read's gradient outside the batch is zero


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_rowwise_steps_equal_per_point_adam_on_dense_gradients(float64, inner_steps):
    """AnalyticELBO (no running table): each update's gradient from the ordinary dense read, then an Adam kept
    per data point (Python dicts) and torch's Adam on the global parameters (on the last inner update)."""
    model, guide, x = problem("autonormal", n=10)
    steps, batch, lr = 6, 4, 0.05
    store = pyro.get_param_store()
    start = {name: value.detach().clone() for name, value in store.named_parameters()}
    history = fit(model, guide, x, loss=AnalyticELBO(), optimizer="rowwise", batch_size=batch, steps=steps, lr=lr,
                  seed=5, progress=False, inner_steps=inner_steps)
    assert history.route == "rowwise" and history.optimizer == "RowwiseAdam"
    learned = {name: value.detach().clone() for name, value in store.named_parameters()}

    # The reference: the same batches (fit's generator), the same initial values.
    generator = torch.Generator().manual_seed(5)
    order = torch.randperm(x.size(0), generator=generator)
    batches = []
    position = 0
    for _ in range(steps):
        if position >= x.size(0):
            order, position = torch.randperm(x.size(0), generator=generator), 0
        batches.append(order[position:position + batch])
        position += batch
    with torch.no_grad():
        for name, value in store.named_parameters():
            value.copy_(start[name])
    local = [parameter.name for parameter in per_point_parameters(guide)]
    global_names = [name for name in learned if name not in local]
    global_params = [store._params[name] for name in global_names]
    optimizer = torch.optim.Adam(global_params, lr=lr)
    state = {}  # (name, point) -> (m, v, t)
    for subsample in batches:
        for inner in range(inner_steps):
            loss = AnalyticELBO().differentiable_loss(model, guide, x, subsample=subsample) / x.size(0)
            grads = torch.autograd.grad(loss, [store._params[name] for name in local] + global_params)
            with torch.no_grad():
                for name, grad in zip(local, grads):
                    param = store._params[name]
                    for point in subsample.tolist():
                        m, v, t = state.get((name, point), (0.0, 0.0, 0))
                        g = grad[point]
                        m, v, t = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g, t + 1
                        state[(name, point)] = (m, v, t)
                        param[point] -= lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        # The global parameters move once per step, with the gradient of its last evaluation.
        for param, grad in zip(global_params, grads[len(local):]):
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad()
    for name, value in store.named_parameters():
        assert torch.allclose(learned[name], value.detach(), rtol=1e-9, atol=1e-10), name


@pytest.mark.parametrize("guide_name", sorted(GUIDE_MAKERS))
def test_a_step_reads_no_per_point_parameter_from_the_store_and_moves_only_the_batch(guide_name):
    from pyro_esc.rowwise import RowwiseStep

    model, guide, x = problem(guide_name, n=20)
    loss = EntropyELBO()
    fit(model, guide, x, loss=loss, batch_size=5, steps=1, optimizer="rowwise", progress=False)
    step = RowwiseStep(model, guide, loss, x, torch.arange(5), lr=0.05)
    statistics = loss.init_statistics(model, guide, x)
    names = {parameter.name for parameter in per_point_parameters(guide)}
    store = pyro.get_param_store()
    before = {name: store._params[name].detach().clone() for name in names}
    subsample = torch.tensor([3, 8, 1, 0, 19])
    with poutine.trace(param_only=True) as capture:
        step.step(x, {"subsample": subsample}, statistics)
    read = set(capture.trace.nodes)
    assert "raw_dictionary" in read
    assert not read & names  # the (N, ...) tensors were never read
    moved = torch.zeros(x.size(0), dtype=torch.bool)
    for name in names:
        moved |= (store._params[name].detach() != before[name]).reshape(x.size(0), -1).any(-1)
    assert sorted(torch.nonzero(moved).flatten().tolist()) == [0, 1, 3, 8, 19]


def test_inner_steps_update_the_rows_k_times_and_the_dictionary_once():
    model, guide, x = problem("local-full", n=16)
    loss = EntropyELBO()
    from pyro_esc.rowwise import RowwiseStep

    fit(model, guide, x, loss=loss, batch_size=4, steps=1, optimizer="rowwise", progress=False)
    step = RowwiseStep(model, guide, loss, x, torch.arange(4), lr=0.05, inner_steps=3)
    step.step(x, {"subsample": torch.tensor([1, 5, 9, 13])}, loss.init_statistics(model, guide, x))
    counts = step.row_optimizers[0].steps
    assert counts[[1, 5, 9, 13]].tolist() == [3, 3, 3, 3] and int(counts.sum()) == 12
    assert step.optimizer.state[step.global_params[0]]["step"] == 1


def test_running_totals_stay_exact_over_ten_thousand_incremental_updates():
    torch.manual_seed(0)
    n, h = 2000, 7
    x = torch.randn(n, 3)
    model, guide = SparseCoding(3, h), object()

    def rows(count):
        return PointStatistics(torch.randn(count) * 10 + 50, torch.rand(count, h) * 3, torch.rand(count) * 100)

    table = RunningStatistics(model, guide, x, rows(n), resum_every=10 ** 9)  # never resummed
    for _ in range(10_000):
        subsample = torch.randperm(n)[:64]
        table.store(subsample, rows(64))
    assert table._stored_since_resum == 640_000
    totals = table.totals()
    fresh = (table.entropy.double().sum(), table.statistic.double().sum(0), table.sq_error.double().sum())
    for kept, exact in zip((totals.entropy, totals.statistic_sum, totals.sq_error_sum), fresh):
        assert torch.allclose(kept.double(), exact, rtol=1e-6, atol=0)
    # By default the totals are summed afresh once every N stored rows: 31 x 64 < 2000 <= 32 x 64.
    table = RunningStatistics(model, guide, x, rows(n))
    for _ in range(31):
        table.store(torch.randperm(n)[:64], rows(64))
    assert table._stored_since_resum == 31 * 64
    table.store(torch.randperm(n)[:64], rows(64))
    assert table._stored_since_resum == 0


def test_combine_uses_the_totals_not_a_fresh_sum():
    # combine must read the stored rows of the batch only: after an update it agrees with a dense mixture.
    torch.manual_seed(1)
    n, h = 50, 4
    x = torch.randn(n, 3, dtype=torch.float64)
    table = RunningStatistics(SparseCoding(3, h), object(), x,
                              PointStatistics(torch.randn(n, dtype=torch.float64), torch.rand(n, h, dtype=torch.float64),
                                              torch.rand(n, dtype=torch.float64)))
    table.store(torch.tensor([3, 4]), PointStatistics(torch.ones(2, dtype=torch.float64),
                                                      torch.ones(2, h, dtype=torch.float64),
                                                      torch.ones(2, dtype=torch.float64)))
    batch = torch.tensor([4, 10, 11])
    current = PointStatistics(torch.full((3,), 2.0, dtype=torch.float64), torch.full((3, h), 2.0, dtype=torch.float64),
                              torch.full((3,), 2.0, dtype=torch.float64))
    combined = table.combine(batch, current)
    expected = table.entropy.clone()
    expected[batch] = 2.0
    assert torch.isclose(combined.entropy, expected.sum())
    expected_abs = table.statistic.clone()
    expected_abs[batch] = 2.0
    assert torch.allclose(combined.statistic_sum, expected_abs.sum(0))


def test_auto_picks_the_em_route_for_per_point_guides_on_minibatches():
    x = bars(40, side=3, seed=0)[0]
    for make_guide, route in [(lambda m: AutoNormal(m, create_plates=m.create_plates), "em"),
                              (LocalMultivariateNormal, "em"),
                              (lambda m: AmortizedNormal(9, 6), "svi")]:
        pyro.clear_param_store()
        model = SparseCoding(9, 6)
        history = fit(model, make_guide(model), x, batch_size=10, steps=2, progress=False)
        assert history.route == route
    pyro.clear_param_store()
    model = SparseCoding(9, 6)
    history = fit(model, LocalMultivariateNormal(model), x, batch_size=10, steps=2, progress=False,
                  optim=pyro.optim.Adam({"lr": 0.01}))
    assert history.route == "svi"


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="rowwise"), "takes minibatches"),
    (dict(optimizer="rowwise", batch_size=10, loss=Trace_ELBO()), "closed-form"),
    (dict(optimizer="rowwise", batch_size=10, optim=pyro.optim.Adam({"lr": 0.1})), "optim"),
    (dict(inner_steps=2, batch_size=10, optimizer="svi"), "inner_steps"),
    (dict(inner_steps=0, batch_size=10), "inner_steps"),
])
def test_rowwise_misuse_is_a_clear_error(kwargs, match):
    x = bars(40, side=3, seed=0)[0]
    model = SparseCoding(9, 6)
    with pytest.raises(ValueError, match=match):
        fit(model, LocalMultivariateNormal(model), x, steps=2, progress=False, **kwargs)


def test_rowwise_needs_a_per_point_guide():
    x = bars(40, side=3, seed=0)[0]
    model = SparseCoding(9, 6)
    with pytest.raises(ValueError, match="per-point guide"):
        fit(model, AmortizedNormal(9, 6), x, optimizer="rowwise", batch_size=10, steps=2, progress=False)


def test_rowwise_training_improves_the_exact_elbo():
    x = bars(300, side=4, noise=0.3, seed=0)[0]
    model = SparseCoding(16, 8)
    guide = LocalMultivariateNormal(model)
    history = fit(model, guide, x, batch_size=50, epochs=15, lr=0.1, inner_steps=2, optimizer="rowwise",
                  progress=False)
    assert history.route == "rowwise"
    assert history.eval_elbo[-1] > history.eval_elbo[0] + 1.0
    assert all(math.isfinite(value) for value in history.eval_elbo)


class RowNormal(pyro.nn.PyroModule):
    """A user's per-point diagonal guide that offers row access (the README's recipe)."""

    def __init__(self, num_data, n_latents):
        super().__init__(name="RowNormal")
        self.loc = pyro.nn.PyroParam(torch.zeros(num_data, n_latents), event_dim=1)
        self.scale = pyro.nn.PyroParam(torch.full((num_data, n_latents), 0.2), torch.distributions.constraints.positive,
                                       event_dim=1)

    def forward(self, x, subsample=None, subsample_size=None):
        with pyro.plate("data", x.size(0), subsample=subsample, subsample_size=subsample_size, dim=-1):
            return pyro.sample("z", pyro.distributions.Normal(self.loc, self.scale).to_event(1))

    def per_point_parameters(self):
        from pyro_esc.rows import parameter_name

        return [parameter_name(self, "loc"), parameter_name(self, "scale")]

    def posterior_from_rows(self, rows):
        from pyro_esc import GaussianPosterior

        return GaussianPosterior.from_scale(*rows)

    def gaussian_posterior(self, x, subsample=None):
        index = slice(None) if subsample is None else subsample
        return self.posterior_from_rows([self.loc[index], self.scale[index]])


def test_a_users_guide_that_declares_its_rows_trains_on_the_rowwise_route(float64):
    x = bars(30, side=3, noise=0.3, seed=0)[0].double()
    model = SparseCoding(9, 6)
    guide = RowNormal(30, 6)
    loss = EntropyELBO()
    statistics = loss.init_statistics(model, guide, x)
    subsample = torch.tensor([5, 2, 17])
    store = pyro.get_param_store()
    dense = optimised(loss, model, guide, x, subsample, statistics)
    dense_grads = torch.autograd.grad(dense, [store._params["RowNormal.loc"], store._params["RowNormal.scale"]])
    leaves, posterior = constrained_rows(guide, subsample)
    substituted = optimised(loss, model, guide, x, subsample, statistics, posterior)
    row_grads = torch.autograd.grad(substituted, [leaves["RowNormal.loc"], leaves["RowNormal.scale"]])
    assert torch.allclose(substituted, dense, rtol=1e-12)
    for dense_grad, row_grad in zip(dense_grads, row_grads):
        assert torch.allclose(row_grad, dense_grad.index_select(0, subsample), rtol=1e-10, atol=1e-12)
    history = fit(model, guide, x, batch_size=10, epochs=3, progress=False)
    assert history.route == "rowwise" and all(math.isfinite(value) for value in history.eval_elbo)
