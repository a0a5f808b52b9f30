"""The pyro-esc command line: every sub-command runs, writes what it says, and fails clearly."""

import json
import subprocess
import sys

import pytest

from pyro_esc.cli import main


@pytest.mark.parametrize("command", [[], ["bars"], ["patches"], ["reproduce"]])
def test_help_of_every_sub_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: pyro-esc" in text
    if command:
        assert "--out" in text and "--seed" in text


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "pyro_esc.cli", "--help"], capture_output=True, text=True,
                            check=True)
    assert "{bars,patches,denoise,reproduce}" in result.stdout


def test_bars_writes_fields_and_metrics(tmp_path, capsys):
    out = tmp_path / "bars"
    assert main(["bars", "--n", "60", "--steps", "20", "--side", "3", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "bars_metrics.json").read_text())
    assert metrics["guide"] == "local-full" and metrics["steps"] == 20 and len(metrics["cosines"]) == 6
    assert (out / "bars_fields_local-full.png").stat().st_size > 0
    assert "of 6 bars found" in capsys.readouterr().out
    assert metrics["annealing"] is None
    import pyro

    from pyro_esc import load

    pyro.clear_param_store()
    saved = load(out / "bars_model.pt")
    assert saved.model.data_dim == 9 and saved.guide is None  # per-point posteriors stay out
    assert saved.metadata["metrics"]["bars_found"] == metrics["bars_found"]
    assert main(["bars", "--n", "60", "--steps", "4", "--side", "3", "--anneal", "2", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "bars_metrics.json").read_text())
    assert metrics["annealing"].startswith("Annealing(num_steps=2, posterior=linear(2)")


def test_bars_with_a_gaussian_prior_reaches_the_ppca_maximum_likelihood(tmp_path, capsys):
    import pyro
    import torch

    from pyro_esc import load
    from pyro_esc.data import bars
    from pyro_esc.evaluate.ppca import ppca_maximum_likelihood

    out = tmp_path / "bars"
    assert main(["bars", "--prior", "gaussian", "--n", "200", "--side", "3", "--noise", "0.1", "--dtype", "float64",
                 "--no-reference", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "bars_metrics.json").read_text())
    assert metrics["prior"] == "Gaussian()" and "gaussian prior" in capsys.readouterr().out
    x, _ = bars(200, side=3, noise=0.1, seed=0, dtype=torch.float64)
    assert abs(metrics["elbo"] - float(ppca_maximum_likelihood(x, 6).log_likelihood)) < 1e-5
    pyro.clear_param_store()
    assert load(out / "bars_model.pt").model.prior.name == "gaussian"


def test_patches_writes_fields_and_metrics(tmp_path):
    out = tmp_path / "patches"
    code = main(["patches", "--n", "200", "--size", "6", "--latents", "8", "--steps", "3", "--batch-size", "50",
                 "--anneal", "2", "--out", str(out), "--quiet"])
    assert code == 0
    metrics = json.loads((out / "patches_metrics.json").read_text())
    assert metrics["n_latents"] == 8 and metrics["size"] == 6 and "kurtosis" in metrics["sparseness"]
    assert metrics["annealing"].startswith("Annealing(num_steps=2,")
    # A sampled objective has no annealing to report, and the command still writes its metrics.
    assert main(["patches", "--n", "200", "--size", "6", "--latents", "8", "--steps", "2", "--objective", "trace",
                 "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "patches_metrics.json").read_text())
    assert metrics["objective"] == "trace" and metrics["annealing"] is None
    assert (out / "patches_fields.png").stat().st_size > 0


def test_patches_runs_in_epochs_with_the_authors_annealing_on_the_rowwise_route(tmp_path):
    out = tmp_path / "paper"
    # The authors' schedule runs five epochs: a shorter run would end on the annealed objective (refused below).
    assert main(["patches", "--n", "200", "--size", "6", "--latents", "8", "--epochs", "5", "--batch-size", "50",
                 "--annealing", "authors", "--inner-steps", "2", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "patches_metrics.json").read_text())
    assert metrics["route"] == "rowwise" and metrics["optimizer"] == "RowwiseAdam"
    assert metrics["steps"] == 20 and metrics["epochs"] == 5
    assert metrics["annealing"].startswith("Annealing(num_steps=20,") and "staircase(10, 5)" in metrics["annealing"]
    assert (out / "patches_curves.png").stat().st_size > 0
    import pyro

    from pyro_esc import load

    pyro.clear_param_store()
    loaded = load(out / "patches_model.pt")
    assert loaded.model.n_latents == 8 and loaded.whitening is not None and loaded.guide is None
    assert loaded.metadata["metrics"]["route"] == "rowwise"
    assert main(["patches", "--anneal", "3", "--annealing", "authors", "--out", str(out), "--quiet"]) == 2
    assert main(["patches", "--n", "200", "--size", "6", "--latents", "8", "--epochs", "2", "--batch-size", "50",
                 "--annealing", "authors", "--out", str(out), "--quiet"]) == 2


def test_patches_on_minibatches_take_the_em_route_and_compare_annealing_settings(tmp_path):
    out = tmp_path / "em"
    assert main(["patches", "--n", "300", "--size", "6", "--latents", "8", "--epochs", "2", "--batch-size", "50",
                 "--annealing", "none", "default", "--chunk", "100", "--out", str(out), "--quiet"]) == 0
    for name in ("none", "default"):
        metrics = json.loads((out / f"patches_metrics_{name}.json").read_text())
        assert metrics["route"] == "em" and metrics["optimizer"] == "EM" and metrics["lr"] is None
        assert metrics["steps"] == 12 and metrics["epochs"] == 2
        assert (out / f"patches_fields_{name}.png").stat().st_size > 0
    assert json.loads((out / "patches_metrics_default.json").read_text())["annealing"].startswith("Annealing(")
    for name in ("patches_curves", "patches_fields_over_training"):
        assert (out / f"{name}.png").stat().st_size > 0, name


def test_the_em_route_refuses_the_authors_annealing_before_training(tmp_path, capsys):
    code = main(["patches", "--n", "200", "--size", "6", "--latents", "8", "--epochs", "2", "--batch-size", "50",
                 "--annealing", "authors", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    assert "grows without bound" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_epoch_snapshots_are_the_papers_epochs():
    from pyro_esc.experiments import epoch_snapshots

    assert epoch_snapshots(10, 204800, 512) == (400, 800, 2000, 4000)
    assert epoch_snapshots(3, 1000, 100) == (10, 20, 30)
    assert epoch_snapshots(4, 1000, None) == (1, 2, 4)
    assert epoch_snapshots(None, 1000, 100) == ()


def test_reproduce_writes_every_figure_and_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_ESC_FAST", "1")
    out = tmp_path / "figures"
    assert main(["reproduce", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fast_mode"] is True
    assert [run["guide"] for run in metrics["bars"]] == ["local-diag", "local-full", "amortized-full"]
    assert len(metrics["patches"]) == 4
    for name in ("bars_samples", "bars_fields", "bars_curves", "patches_fields", "patches_curves",
                 "patches_fields_over_training", "patches_samples"):
        assert (out / f"{name}.png").stat().st_size > 0, name


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert main(["bars", "--steps", "0", "--out", str(tmp_path), "--quiet"]) == 2
    assert "pyro-esc bars: error: steps must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bars", "--guide", "nonsense"])
    assert exit_info.value.code == 2
