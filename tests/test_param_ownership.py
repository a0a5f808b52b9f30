"""One model cannot overwrite another: fit refuses a model or guide whose param-store names hold another's tensors.

Pyro's PyroModules read their parameters from the global param store by name and adopt whatever tensor is
stored there, so before this check a second model trained in the same store started from the first one's
values and, training, overwrote them (model A's ELBO went from -18.96 to -43.28).
"""

import pytest
import torch

import pyro
from pyro.infer.autoguide import AutoNormal

from pyro_esc import AmortizedNormal, LocalMultivariateNormal, SparseCoding, fit, training_elbo
from pyro_esc._pyro_internals import foreign_parameters
from pyro_esc.data import bars

MESSAGE = r"already holds .* for another model or guide of the same names.*scope"


def trained(make_guide, x, steps=20):
    model = SparseCoding(x.size(1), 6)
    guide = make_guide(model)
    fit(model, guide, x, steps=steps, tol=None, progress=False)
    return model, guide


def parameters(*modules):
    return [tensor.detach().clone() for module in modules for tensor in module.parameters()]


@pytest.mark.parametrize("make_guide", [LocalMultivariateNormal,
                                        lambda model: AutoNormal(model, create_plates=model.create_plates),
                                        lambda model: AmortizedNormal(model.data_dim, model.n_latents)])
def test_a_second_model_in_the_same_store_is_refused_and_the_first_is_untouched(make_guide):
    x, _ = bars(40, side=3, seed=0)
    first, first_guide = trained(make_guide, x)
    before, elbo = parameters(first, first_guide), training_elbo(first, first_guide, x)
    second = SparseCoding(x.size(1), 6)
    with pytest.raises(ValueError, match=MESSAGE):
        fit(second, make_guide(second), bars(40, side=3, seed=1)[0], steps=5, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(first, first_guide)))
    assert training_elbo(first, first_guide, x) == elbo


def test_a_new_guide_for_a_trained_model_is_refused_where_the_old_guides_parameters_are():
    x, _ = bars(40, side=3, seed=0)
    model, _ = trained(LocalMultivariateNormal, x)
    assert foreign_parameters(model) == []
    fresh = LocalMultivariateNormal(model)
    assert foreign_parameters(fresh) == sorted(name for name in pyro.get_param_store().keys()
                                               if name.startswith("LocalMultivariateNormal."))
    with pytest.raises(ValueError, match=MESSAGE):
        fit(model, fresh, x, steps=5, progress=False)


def test_models_in_scopes_of_their_own_train_side_by_side():
    x, _ = bars(40, side=3, seed=0)
    first, first_guide = trained(LocalMultivariateNormal, x)
    before = parameters(first, first_guide)
    with pyro.get_param_store().scope():
        second, second_guide = trained(LocalMultivariateNormal, bars(40, side=3, seed=1)[0])
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(first, first_guide)))
    assert not torch.equal(first.dictionary.detach(), second.dictionary.detach())


def test_training_the_same_model_and_guide_again_continues():
    x, _ = bars(40, side=3, seed=0)
    model, guide = trained(LocalMultivariateNormal, x, steps=10)
    history = fit(model, guide, x, steps=10, tol=None, progress=False)
    assert history.step[-1] == 10


def test_encoding_and_evaluating_a_model_read_its_own_parameters_whatever_the_store_holds(tmp_path):
    # Model A trained, the store cleared, model B (the same parameter names) trained in it: using A now must
    # give what it gave before, and must not make A adopt B's tensors.
    from pyro_esc import encode, load, log_likelihood, save, solve_posteriors
    from pyro_esc.evaluate.ppca import ppca_log_likelihood

    torch.manual_seed(0)
    x = torch.randn(60, 9, dtype=torch.float64) * torch.linspace(2, 0.5, 9, dtype=torch.float64)
    pyro.clear_param_store()
    first = SparseCoding(9, 3, prior="gaussian")
    first_guide = LocalMultivariateNormal(first)
    fit(first, first_guide, x, steps=30, tol=None, progress=False)
    before = parameters(first)
    with pyro.get_param_store().scope():
        solved = solve_posteriors(first, x[:5], "full").posterior.mean
        encoded = encode(first, first_guide, x[:5]).mean
        estimate = log_likelihood(first, encode(first, first_guide, x[:5]), x[:5], num_samples=8, seed=0).per_point
        exact = ppca_log_likelihood(first, x[:5])
    pyro.clear_param_store()
    second = SparseCoding(9, 3, prior="gaussian")
    fit(second, LocalMultivariateNormal(second), 3 * x, steps=30, tol=None, progress=False)
    assert torch.allclose(solve_posteriors(first, x[:5], "full").posterior.mean, solved)
    assert torch.allclose(encode(first, first_guide, x[:5]).mean, encoded)
    q = encode(first, first_guide, x[:5])
    assert torch.allclose(log_likelihood(first, q, x[:5], num_samples=8, seed=0).per_point, estimate)
    assert torch.allclose(ppca_log_likelihood(first, x[:5]), exact)
    save(tmp_path / "first.pt", first)
    with pyro.get_param_store().scope():
        assert torch.allclose(load(tmp_path / "first.pt").model.dictionary, first.dictionary.detach())
    assert all(torch.equal(a, b) for a, b in zip(parameters(first), before))
