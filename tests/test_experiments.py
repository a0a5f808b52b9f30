"""The run_* result records: typed fields, and metrics() as the JSON-ready dict the metrics files hold."""

import json
import math

import pytest
import torch

from pyro_esc import History
from pyro_esc.experiments import BarsResult, PatchesResult, patch_data, run_bars, run_patches

# The keys of bars_metrics.json and of each "bars" entry of metrics.json, in order.
BARS_KEYS = ["guide", "objective", "n", "side", "noise", "steps", "lr", "batch_size", "seed", "init_seed", "dtype",
             "annealing", "optimizer", "n_init", "converged", "stop_reason", "elbo", "reference_elbo",
             "elbo_minus_reference", "restart_elbos", "bars_found", "all_bars_found", "cosines", "wall_time_s",
             "noise_var", "warm_start", "hidden", "prior"]
# The keys of patches_metrics.json and of each "patches" entry of metrics.json, in order.
PATCHES_KEYS = ["guide", "objective", "annealing", "n", "size", "n_latents", "steps", "epochs", "batch_size", "lr",
                "seed", "route", "optimizer", "elbo", "wall_time_s", "sparseness", "mean_field_spread_px",
                "median_field_spread_px"]


def assert_plain_json(value):
    """Only JSON's own types all the way down (no tensors, numpy scalars or histories)."""
    if isinstance(value, dict):
        assert all(isinstance(key, str) for key in value), value
        for item in value.values():
            assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain_json(item)
    else:
        assert value is None or type(value) in (bool, int, float, str), (type(value), value)


@pytest.fixture(scope="module")
def bars_result():
    return run_bars(n=60, steps=5, progress=False)


@pytest.fixture(scope="module")
def patches_result():
    x, whitening = patch_data(200, 6, 0)
    return run_patches(x, whitening, 6, n_latents=8, steps=3, progress=False, snapshots={1, 3})


def test_run_bars_returns_a_bars_result_whose_metrics_are_plain_json(bars_result):
    assert isinstance(bars_result, BarsResult)
    metrics = bars_result.metrics()
    assert list(metrics) == BARS_KEYS
    assert_plain_json(metrics)
    assert json.loads(json.dumps(metrics)) == metrics
    assert metrics["steps"] == 5 and metrics["n"] == 60 and len(metrics["cosines"]) == 10
    assert metrics["elbo"] == bars_result.elbo and math.isfinite(bars_result.elbo)
    assert isinstance(bars_result.history, History)
    assert isinstance(bars_result.dictionary, torch.Tensor) and bars_result.dictionary.shape == (25, 10)


def test_run_patches_returns_a_patches_result_whose_metrics_are_plain_json(patches_result):
    assert isinstance(patches_result, PatchesResult)
    metrics = patches_result.metrics()
    assert list(metrics) == PATCHES_KEYS
    assert set(metrics["sparseness"]) == {"kurtosis", "l1_l2"}
    assert_plain_json(metrics)
    assert json.loads(json.dumps(metrics)) == metrics
    assert metrics["n"] == 200 and metrics["size"] == 6 and metrics["n_latents"] == 8 and metrics["steps"] == 3
    assert metrics["elbo"] == patches_result.elbo and math.isfinite(patches_result.elbo)
    assert isinstance(patches_result.history, History)
    assert patches_result.dictionary.shape == (36, 8)
    assert sorted(patches_result.snapshots) == [1, 3]
    assert all(value.shape == (36, 8) for value in patches_result.snapshots.values())
    # The last snapshot is the final dictionary, in the same (largest lambda first) column order.
    assert torch.equal(patches_result.snapshots[3], patches_result.dictionary)


def test_metrics_is_a_copy_and_the_repr_leaves_out_tensors(bars_result, patches_result):
    metrics = patches_result.metrics()
    metrics["sparseness"]["kurtosis"] = "edited"
    metrics["elbo"] = "edited"
    assert patches_result.metrics()["sparseness"]["kurtosis"] != "edited"
    bars_result.metrics()["cosines"].append(2.0)
    assert len(bars_result.cosines) == 10
    for result in (bars_result, patches_result):
        text = repr(result)
        assert "elbo=" in text and "tensor" not in text and "History" not in text
