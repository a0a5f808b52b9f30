"""Bars recovery and dictionary distance on constructed cases."""

import pytest
import torch

from pyro_esc.data import bars_dictionary
from pyro_esc.metrics import bars_recovery, code_sparseness, dictionary_distance, field_spread


def test_permuted_and_sign_flipped_dictionary_is_fully_recovered():
    true = bars_dictionary(4)
    permutation = torch.randperm(8)
    learned = true[:, permutation] * torch.tensor([1.0, -1, 1, -1, 1, 1, -1, 1]) * 3
    recovery = bars_recovery(learned, true)
    assert recovery.all_found and recovery.num_found == 8
    assert torch.allclose(recovery.cosines, torch.ones(8, dtype=torch.float64))
    assert torch.equal(permutation[recovery.matching], torch.arange(8))
    assert dictionary_distance(learned, true) < 1e-12


def test_one_learned_column_cannot_explain_two_bars():
    true = bars_dictionary(3)
    learned = true.clone()
    learned[:, 1] = true[:, 0]  # duplicate of bar 0; bar 1 is missing
    recovery = bars_recovery(learned, true)
    assert recovery.num_found == 5 and not recovery.all_found
    assert recovery.cosines.min() < 0.95


def test_overcomplete_dictionaries_are_matched():
    true = bars_dictionary(3)
    learned = torch.cat([torch.randn(9, 4), true], dim=1)
    assert bars_recovery(learned, true).all_found


def test_distance_of_orthogonal_columns_is_sqrt2():
    true = torch.eye(4)[:, :2]
    learned = torch.eye(4)[:, 2:]
    assert abs(dictionary_distance(learned, true) - 2 ** 0.5) < 1e-12


@pytest.mark.parametrize("learned, true, message", [
    (torch.ones(4), torch.ones(4, 2), "matrices"),
    (torch.ones(5, 2), torch.ones(4, 2), "data dimension"),
    (torch.ones(4, 1), torch.ones(4, 2), "fewer"),
])
def test_bad_shapes_are_clear_errors(learned, true, message):
    with pytest.raises(ValueError, match=message):
        bars_recovery(learned, true)


def test_code_sparseness_of_laplace_and_gaussian_codes():
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(200_000, 3, generator=generator, dtype=torch.float64)
    uniform = torch.rand(200_000, 3, generator=generator, dtype=torch.float64) - 0.5
    laplace = -torch.sign(uniform) * torch.log1p(-2 * uniform.abs())
    assert abs(code_sparseness(gaussian)["kurtosis"]) < 0.1
    assert abs(code_sparseness(laplace)["kurtosis"] - 3.0) < 0.3
    one_hot = torch.eye(4).repeat(5, 1)
    assert abs(code_sparseness(one_hot)["l1_l2"] - 0.5) < 1e-12  # 1 / sqrt(4)
    assert abs(code_sparseness(torch.ones(5, 4))["l1_l2"] - 1.0) < 1e-12
    with pytest.raises(ValueError, match="codes"):
        code_sparseness(torch.ones(4))


def test_field_spread_of_a_point_a_bar_and_a_uniform_field():
    point = torch.zeros(25, 1)
    point[12] = 1.0
    bar = bars_dictionary(5)[:, :1]  # one horizontal bar: rows constant, columns 0..4
    uniform = torch.ones(25, 1)
    spreads = field_spread(torch.cat([point, bar, uniform], dim=1), (5, 5))
    # Independent values: variance of 0..4 uniform is 2, so a bar spreads sqrt(2), a plane sqrt(4).
    assert torch.allclose(spreads, torch.tensor([0.0, 2 ** 0.5, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="fields must have shape"):
        field_spread(torch.ones(24, 2), (5, 5))
