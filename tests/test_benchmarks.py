"""Smoke tests: every benchmark script runs end to end at tiny sizes (the real runs are not CI's job)."""

import importlib.util
import math
import pathlib
import sys

import pytest
from helpers import commit_in_history


BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    # As `python benchmarks/<name>.py` does: the scripts import the module beside them (records.py).
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_objective_speed_prints_both_ratios(capsys):
    median = load("objective_speed").main(["--n", "50", "--steps", "2", "--rounds", "1"])
    assert set(median) == {"EntropyELBO (SVI)", "Trace_ELBO (SVI, 1 particle)", "SVI floor (plain math in SVI)",
                           "EntropyELBO (ELBOModule + Adam)", "plain PyTorch loop"}
    out = capsys.readouterr().out
    assert "ratio EntropyELBO / Trace_ELBO" in out and "ratio EntropyELBO / plain loop" in out
    assert "ratio ELBOModule  / plain loop" in out


def test_paper_scale_times_fit_the_floor_and_svi_in_subprocesses(capsys):
    load("paper_scale").main(["--sizes", "1500", "3000", "--steps", "10", "--svi-up-to", "1500"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1,500") or line.startswith("| 3,000")]
    assert len(rows) == 2 and rows[1].split("|")[5].strip() == "-"  # no SVI line above --svi-up-to
    assert "bytes per data point" in out


def test_minibatch_route_tabulates_each_setting(capsys):
    load("minibatch_route").main(["--patches", "600", "--epochs", "1", "--bars-epochs", "1",
                                  "--only", "em", "svi:1:0.05", "rowwise:2:0.2"])
    out = capsys.readouterr().out
    assert out.count("| rowwise | 2 | 0.2 | 1 |") == 2 and out.count("| svi | - | 0.05 | 1 |") == 2
    assert out.count("| em | - | - | 1 |") == 2


def test_estimators_measures_noise_speed_and_convergence(tmp_path):
    result = load("estimators").main(["--n", "40", "--warm-steps", "5", "--repeats", "3", "--rounds", "1",
                                      "--steps", "1", "--budget", "0.3", "--evaluations", "2", "--lrs", "0.05",
                                      "--json", str(tmp_path / "estimators.json")])
    noise = result["noise"]
    # The closed forms are deterministic: repeated gradients are identical, variance exactly 0.
    for name in ("EntropyELBO", "AnalyticELBO"):
        assert noise[name]["grad_exactly_repeatable"] and noise[name]["grad_total_variance"] == 0
    assert noise["Trace_ELBO (1)"]["grad_total_variance"] > 0
    assert all(math.isfinite(value) for value in result["time_per_step"].values())
    assert (tmp_path / "estimators.json").exists()


def test_bars_recovery_runs_every_requested_configuration(capsys):
    results = load("bars_recovery").main(["--configs", "local", "amortized-full", "--seeds", "1", "--recipe", "adam", "--steps", "5"])
    assert set(results) == {"local", "amortized-full"}
    found, all_found, elbo, seconds = results["local"][0]
    assert 0 <= found <= 10 and math.isfinite(elbo) and seconds > 0
    assert "| LocalMultivariateNormal + EntropyELBO" in capsys.readouterr().out


def test_vs_sklearn_reports_bars_and_patches(tmp_path, capsys):
    results = load("vs_sklearn").main([
        "--seeds", "1", "--alphas", "1.0", "--n", "60", "--steps", "3", "--dl-max-iter", "2", "--mb-epochs", "1",
        "--heldout-steps", "3", "--patch-n", "200", "--patch-test-n", "30", "--patch-size", "6",
        "--patch-components", "6", "--patch-steps", "3", "--patch-dl-max-iter", "1", "--patch-mb-epochs", "1",
        "--json", str(tmp_path / "vs_sklearn.json")])
    headline = results["bars"]["headline"]
    methods = [row["method"] for row in headline]
    # Each sklearn method under both alpha criteria, then pyro_esc.
    assert methods.count("DictionaryLearning") == 2 and methods.count("MiniBatchDictionaryLearning") == 2
    assert methods[-1].startswith("pyro_esc")
    for row in headline:
        assert 0 <= row["all_found"] <= row["seeds"] == 1 and 0 <= row["mean_bars"] <= 10
        assert all(math.isfinite(row[key]) and row[key] >= 0 for key in ("test_own_mse", "test_common_mse", "fit_s_mean"))
    assert {row["method"] for row in results["bars"]["references"]} == {"true dictionary", "PCA, 10 components"}
    patches = results["patches"]["results"]
    assert len(patches) == 5 and patches[-1]["method"].startswith("pyro_esc")
    assert all(row["fit_s"] >= 0 and math.isfinite(row["test_common_mse"]) for row in patches)
    assert patches[-1]["curve"] and (tmp_path / "vs_sklearn.json").exists()
    out = capsys.readouterr().out
    assert "| pyro_esc LocalMVN + EntropyELBO" in out and "test MSE common coder" in out


def test_bars_grid_records_each_run_and_tabulates(tmp_path, capsys):
    out = str(tmp_path / "grid.jsonl")
    arguments = ["--sides", "4", "--noises", "0.3", "--seeds", "2", "--inits", "2", "--n", "60", "--steps", "3",
                 "--out", out]
    grid = load("bars_grid")
    records = grid.main(arguments)
    assert [(r["seed"], r["init_seed"]) for r in records] == [(0, 0), (0, 1), (1, 1), (1, 2)]
    assert all(0 <= r["bars_found"] <= 8 for r in records)
    known = grid.main(["--references", "--out", out])  # one float64 reference per data set
    assert sorted(known) == [(4, 0.3, 0, 60), (4, 0.3, 1, 60)]
    records = grid.main(["--table", "--out", out])
    assert all(math.isfinite(r["elbo_minus_reference"]) for r in records)
    kept = grid.restarts(records, "full", 4, 0.3, 2)  # what n_init = 2 keeps: the best of two inits
    assert [r["elbo"] for r in kept] == [max(records[0]["elbo"], records[1]["elbo"]),
                                         max(records[2]["elbo"], records[3]["elbo"])]
    out = capsys.readouterr().out
    assert "| 4 | 0.3 | 1 |" in out and "| 4 | 0.3 | 2 |" in out
    assert grid.main(arguments) == records  # runs already recorded are not run again
    warm = grid.main(["--families", "amortized-warm", "--sides", "4", "--noises", "0.3", "--seeds", "1", "--n", "60",
                      "--steps", "3", "--out", str(tmp_path / "warm.jsonl")])
    assert warm[0]["family"] == "amortized-warm" and warm[0]["warm_start"] is True


def test_amortisation_gap_runs_the_warm_started_recipe(tmp_path):
    out = str(tmp_path / "gap.jsonl")
    # 100 match points and 100 model samples per Adam step; none (no Adam stage); the joint stage
    recipes = ("warm-m100-s100", "warm-m100-s0", "warm5-m100-s0-j")
    for recipe in recipes:
        text = load("amortisation_gap").main(["--configs", "h100-full-skip", "--data", "bars0.3", "--seeds", "1",
                                              "--recipe", recipe, "--steps", "3", "--n", "60", "--refine", "2",
                                              "--out", out])
    assert all(f"| {recipe} " in text for recipe in recipes)
    import json

    with_samples, without, joint = [json.loads(line) for line in open(out)]
    # --steps limits every stage
    assert with_samples["stage_steps"] == {"dictionary": 3, "encoder": 0, "joint": 0, "samples": 3}
    assert without["stage_steps"] == {"dictionary": 3, "encoder": 0, "joint": 0, "samples": 0}
    assert joint["stage_steps"] == {"dictionary": 3, "encoder": 3, "joint": 3, "samples": 0}
    for record in (with_samples, without, joint):
        assert record["gap_train"] >= -1e-3 and record["refined_gap_train"] <= record["gap_train"] + 1e-3
    # -nS: S steps of the last stage (under --steps); v1- records are historical and are not rerun.
    arguments = ["--configs", "h100-full-skip", "--data", "bars0.3", "--seeds", "1", "--steps", "3", "--n", "60",
                 "--out", out]
    load("amortisation_gap").main(arguments + ["--recipe", "warm-m100-s100-n2"])
    assert json.loads(open(out).readlines()[-1])["stage_steps"]["samples"] == 2
    with pytest.raises(ValueError, match="historical"):
        load("amortisation_gap").main(arguments + ["--recipe", "v1-warm-f9000"])


def test_amortised_default_compares_the_warm_start_with_training_from_scratch(tmp_path):
    out = str(tmp_path / "default.jsonl")
    text = load("amortised_default").main(["--sides", "3", "--noises", "0.3", "--seeds", "1", "--n", "60",
                                                    "--steps", "3", "--out", out])
    import json

    records = [json.loads(line) for line in open(out)]
    assert [r["method"] for r in records] == ["warm", "scratch"]
    assert records[0]["hidden"] == [300] and records[1]["hidden"] == [100]
    assert records[0]["skip"] and not records[1]["skip"]
    assert all(r["gap_test"] > -1e-3 and 0 <= r["bars_found"] <= 6 for r in records)
    assert "| 3x3 | 0.3 | warm (1 x 300, skip) | 1 |" in text


def test_amortisation_gap_names_its_bars_settings():
    gap = load("amortisation_gap")
    x, x_test, dictionary = gap.make_data("bars6-0.1", seed=0, n=20)
    assert x.shape == x_test.shape == (20, 36) and dictionary.shape == (36, 12) and gap.n_latents("bars6-0.1") == 12
    assert gap.bars_setting("bars0.3") == (5, 0.3) and gap.n_latents("bars0.3") == 10
    # The noise is the data's: 6 x 6 bars at sigma 0.1 differ from their noiseless images by about 0.1.
    from pyro_esc.data import bars

    clean, _ = bars(20, side=6, noise=0.0, seed=0)
    assert abs(float((x - clean).std()) - 0.1) < 0.01


def test_minibatch_bias_measures_batch_and_running_estimates(capsys):
    result = load("minibatch_bias").main(["--n", "40", "--batch-sizes", "5", "--batches", "30", "--train-steps", "3"])
    row = result["rows"][5]
    assert math.isfinite(row["bias"]) and row["standard_error"] > 0
    assert abs(row["running_minus_exact"]) < 1e-9  # a fresh table is exact
    assert "| 5 |" in capsys.readouterr().out


def test_restart_screening_summarises_runs(tmp_path, capsys):
    import json

    runs = tmp_path / "runs.jsonl"
    rows = [{"seed": 0, "restart": 0, "final": -9.0, "bars": 7, "steps": 10, "time": 1.0,
             "traj": {"200": -9.5, "400": -9.2}},
            {"seed": 0, "restart": 1, "final": -8.8, "bars": 10, "steps": 10, "time": 2.0,
             "traj": {"200": -9.6, "400": -9.1}}]
    runs.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    load("restart_screening").main(["--summary", str(runs), "--restarts", "2"])
    out = capsys.readouterr().out
    assert "| 1 | 0 of 1 | 1.0 |" in out and "| 2 | 1 of 1 | 3.0 |" in out
    assert "after 200 steps names the best final run in 0 of 1" in out
    assert "after 400 steps names the best final run in 1 of 1" in out


def test_denoising_tabulates_every_method(capsys):
    rows = load("denoising").main(["--downsample", "8", "--sigmas", "0.1", "--steps", "5", "--max-patches", "200",
                                   "--latents", "8"])
    names = set(rows[0.1])
    assert {"noisy", "pyro_esc", "pyro_esc, blind", "scikit-learn OMP, 2 atoms"} <= names
    assert "| pyro_esc |" in capsys.readouterr().out


def test_entropy_vs_analytic_trains_both_objectives_from_the_same_start(capsys):
    rows = load("entropy_vs_analytic").main(["--seeds", "0", "1", "--noise", "0.3", "--n", "60", "--steps", "5",
                                              "--side", "3"])
    assert [(r["optimizer"], r["objective"]) for r in rows] == [("lbfgs", "entropy"), ("lbfgs", "analytic"),
                                                               ("svi", "entropy"), ("svi", "analytic")]
    assert all(r["steps"] <= 5 and math.isfinite(r["elbo"]) for r in rows)
    out = capsys.readouterr().out
    assert "| 0.3 | lbfgs | analytic | " in out and "| 0.3 | svi | entropy | " in out


def test_field_frequencies_measures_gratings_and_the_committed_figure():
    import numpy as np

    module = load("field_frequencies")
    checkerboard = np.indices((12, 12)).sum(0) % 2 * 2.0 - 1
    assert abs(module.mean_frequency(checkerboard) - math.sqrt(0.5)) < 1e-12  # (1/2, 1/2) cycles per pixel
    stripes = np.cos(2 * np.pi * np.arange(12) / 4)[:, None] * np.ones((1, 12))
    assert abs(module.mean_frequency(stripes) - 0.25) < 1e-12
    by_row = module.main([])  # the committed figure: 12 rows of 12 fields
    assert len(by_row) == 12 and by_row[-1] > by_row[0]


def test_patch_encoders_trains_each_encoder_as_reproduce_does(tmp_path):
    out = str(tmp_path / "encoders.jsonl")
    text = load("patch_encoders").main(["--size", "tiny", "--epochs", "1", "--held-out", "40", "--full-optimum",
                                        "--configs", "h100-diag", "h100-lowrank", "--out", out])
    assert "1 x 100, low-rank 5" in text and "1 x 100, diag" in text
    import json

    records = [json.loads(line) for line in open(out)]
    # Per-point posteriors of a family are at least as good as an encoder's of that family (or a smaller one).
    assert all(r["gap_full_optimum"] > -1e-3 for r in records)
    assert [r["gap_diag_optimum"] > -1e-3 for r in records if r["config"] == "h100-diag"] == [True]


def test_solver_speed_compares_the_solver_with_joint_lbfgs_at_both_thread_counts(capsys):
    results = load("solver_speed").main(["--patches", "60", "--train", "600", "--bars", "40"])
    for name in ("patches", "bars"):
        rows = results[name]
        assert [row[0] for row in rows] == [1, 2]
        # The solver's per-point optimum is never worse than the joint L-BFGS fit's (a tolerance apart).
        assert all(row[4] > -1e-6 and row[6] for row in rows)
    assert "SparseCoder / solver" in capsys.readouterr().out


def test_learning_at_scale_records_each_route_and_tabulates(tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    load("learning_at_scale").main(["--n", "1200", "--size", "8", "--epochs", "1", "--batch", "200",
                                    "--routes", "em:chunk=600", "rowwise", "--out", str(out)])
    capsys.readouterr()
    load("learning_at_scale").main(["--table", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| 1,200 | 8 | none | em, chunk 600, momentum 0 | 1 |" in table
    assert "| 1,200 | 8 | none | rowwise | 1 |" in table


def test_estimator_speed_times_each_guide_and_solver(capsys):
    rows = load("estimator_speed").main(["--n", "40", "--configs", "local-diag:em", "local-full:lbfgs",
                                         "--max-iter", "5"])
    assert [(row["guide"], row["solver"]) for row in rows] == [("local-diag", "em"), ("local-full", "lbfgs")]
    assert all(math.isfinite(row["score"]) for row in rows)
    assert "| local-full | lbfgs | 1 |" in capsys.readouterr().out


def test_units_tabulates_each_route_and_scale(capsys):
    load("units").main(["--n", "200", "--steps", "30", "--gradient-steps", "5", "--routes", "lbfgs-full",
                        "em-minibatch", "svi-diag", "rowwise-full", "svi-encoder", "--scales", "1", "255", "--seeds",
                        "0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 10 and all("/10 |" in row for row in rows)


def test_ppca_compares_each_route_with_the_closed_form(capsys):
    load("ppca").main(["--n", "2000", "--sizes", "6", "2", "--seeds", "0", "--routes", "lbfgs-full", "lbfgs-diag"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[3] for row in rows] == ["lbfgs-full", "lbfgs-diag"]
    assert all(float(row[4]) < 1e-9 for row in rows)  # an ELBO never exceeds the log-likelihood
    assert abs(float(rows[0][4])) < 1e-5  # full covariances reach the maximum likelihood here


def test_amortised_patches_runs_both_halves_and_the_scratch_path(tmp_path):
    import json

    out, figures = str(tmp_path / "patches.jsonl"), tmp_path / "figures"
    small = ["--n", "600", "--size", "6", "--latents", "8", "--epochs", "2", "--batch", "200", "--test", "200",
             "--out", out]
    load("amortised_patches").main(small + ["--sample-steps", "20", "--annealing", "none", "--figures", str(figures)])
    text = load("amortised_patches").main(small + ["--scratch", "--annealing", "none"])
    warm, scratch = [json.loads(line) for line in open(out)]
    assert warm["method"] == "warm" and scratch["method"] == "scratch" and warm["sample_steps"] == 20
    # Both gaps are measured against the solver's optimum of the same held-out patches' kind: >= 0.
    assert warm["test_gap"] >= -1e-3 and scratch["test_gap"] >= -1e-3
    assert warm["test_optimum"] == pytest.approx(warm["test_encoder"] + warm["test_gap"])
    assert (figures / "paper_scale_amortised_curves.png").exists()
    assert (figures / "paper_scale_amortised_fields.png").exists()
    assert "- (from scratch)" in text


def test_every_table_in_benchmarks_md_names_the_commit_it_measured():
    # BENCHMARKS.md once said most of its numbers predated the current defaults: a table now carries the commit
    # whose package it measured, on the line after it, and that commit is in this history.
    import re

    lines = (pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
    unstamped, commits = [], set()
    for number, line in enumerate(lines):
        is_table_end = line.startswith("|") and (number + 1 == len(lines) or not lines[number + 1].startswith("|"))
        if not is_table_end or not any(row.startswith("|---") for row in lines[max(0, number - 60):number]):
            continue
        following = next((row for row in lines[number + 1:] if row.strip()), "")
        stamp = re.match(r"\*Measured at commits? `([0-9a-f]{7,40})`(?:,? (?:and )?`([0-9a-f]{7,40})`)* \((\d{4}-\d\d-\d\d)",
                         following)
        if stamp is None:
            unstamped.append(f"line {number + 1}: {line[:60]}")
        else:
            commits.update(re.findall(r"`([0-9a-f]{7,40})`", following.split("(")[0]))
    assert not unstamped, f"tables without a '*Measured at commit `...` (date)' line after them: {unstamped}"
    missing = [commit for commit in sorted(commits) if not commit_in_history(commit)]
    assert not missing, f"BENCHMARKS.md names commits that are not in this history: {missing}"
