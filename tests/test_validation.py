"""Bad input gets a clear ValueError that names the argument."""

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoDelta, AutoIAFNormal, AutoNormal

from pyro_esc import AnalyticELBO, EntropyELBO, SparseCoding
from pyro_esc.data import bars

OBJECTIVES = [EntropyELBO, AnalyticELBO]


@pytest.fixture
def data():
    x, _ = bars(20, side=3)
    return x


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("bad, message", [
    (lambda x: x[0], r"x must have shape \(N, D\)"),
    (lambda x: x[:, :5], "data dimension 5 .* data_dim = 9"),
    (lambda x: torch.where(torch.arange(9) == 4, float("nan"), x), "x must be finite"),
    (lambda x: torch.where(torch.arange(9) == 4, float("inf"), x), "x must be finite"),
    (lambda x: x.long(), "floating-point"),
    (lambda x: x.numpy(), "torch.Tensor"),
    (lambda x: x[:0], "at least one data point"),
])
def test_bad_data_is_a_clear_value_error(data, objective, bad, message):
    model = SparseCoding(9, 6)
    with pytest.raises(ValueError, match=message):
        objective().loss(model, AutoNormal(model), bad(data))


def test_bad_data_is_caught_by_the_model_itself(data):
    with pytest.raises(ValueError, match="x must be finite"):
        SparseCoding(9, 6)(torch.full_like(data, float("nan")))


def test_in_place_corruption_after_a_good_call_is_still_caught(data):
    model = SparseCoding(9, 6)
    guide = AutoNormal(model)
    EntropyELBO().loss(model, guide, data)
    data[3, 3] = float("nan")  # bumps the tensor's version: validated again
    with pytest.raises(ValueError, match="x must be finite"):
        EntropyELBO().loss(model, guide, data)


@pytest.mark.parametrize("subsample, message", [
    (torch.tensor([0, 25]), r"indices in \[0, 20\)"),
    (torch.tensor([[0, 1]]), "1-D integer"),
    (torch.tensor([0.0, 1.0]), "1-D integer"),
])
def test_bad_subsample_is_a_clear_value_error(data, subsample, message):
    model = SparseCoding(9, 6)
    with pytest.raises(ValueError, match=message):
        EntropyELBO().loss(model, AutoNormal(model), data, subsample=subsample)


def laplace_guide(x, subsample=None):
    loc = pyro.param("loc", torch.zeros(x.size(0), 6))
    with pyro.plate("data", x.size(0)):
        pyro.sample("z", dist.Laplace(loc, 1.0).to_event(1))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("make_guide, name", [
    (AutoDelta, "AutoDelta"),
    (lambda model: AutoIAFNormal(model, num_transforms=1), "AutoIAFNormal"),
    (lambda model: laplace_guide, "laplace_guide"),
])
def test_non_gaussian_guide_is_a_clear_value_error(data, objective, make_guide, name):
    model = SparseCoding(9, 6)
    with pytest.raises(ValueError, match=f"{name}.*Supported guides: AutoNormal.*gaussian_posterior"):
        objective().loss(model, make_guide(model), data)


def test_the_error_names_the_distribution_not_its_wrapper(data):
    model = SparseCoding(9, 6)
    with pytest.raises(ValueError, match="laplace_guide's 'z' site is Laplace \\(in Independent\\)"):
        EntropyELBO().loss(model, laplace_guide, data)


def test_objectives_need_a_sparse_coding_model(data):
    def model(x):
        pyro.sample("z", dist.Normal(0, 1))

    with pytest.raises(ValueError, match="model must be a pyro_esc.SparseCoding"):
        EntropyELBO().loss(model, AutoNormal(model), data)
