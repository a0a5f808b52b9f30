"""scikit-learn's dictionary learning against full-covariance EntropyELBO: bars and whitened patches.

Bars: the standard test of benchmarks/bars_recovery.py (5x5, H = 10, N = 1000, sigma = 0.3),
seeds 10-19, each with its own held-out test and validation sets (1000 points each).
scikit-learn's DictionaryLearning and MiniBatchDictionaryLearning (coordinate descent,
``n_components=10``) are swept over alpha; two alphas are reported per method: the one a
user without ground truth would pick (lowest validation MSE of the common coder) and the
oracle (most seeds with all bars, then most bars, then the fastest fit). pyro_esc learns
lambda and sigma^2, so it has no alpha: LocalMultivariateNormal + EntropyELBO with fit's
defaults (``--recipe adam``: the bars recipe, ``experiments.bars_optimizer``, 2000 steps). Held-out
reconstruction error is reported twice: with each method's own coder (sklearn's ``transform`` at its
training alpha; pyro_esc's posterior means from ``encode``, the per-point optima with the dictionary,
lambda and sigma^2 fixed) and with one common coder (lasso_lars at the
generating model's MAP alpha sigma^2 / lambda) on unit-length atoms, which compares
dictionaries rather than coders.

Patches: whitened 16x16 patches, wall time to a dictionary of 100 atoms for sklearn's
settings and for pyro_esc (AutoNormal + EntropyELBO, full batch), with held-out MSE and the
spatial spread of the fields (``metrics.field_spread``).

Run (about 37 minutes here; ``--seeds 3 --skip-patches`` for a 10-minute look):

    python benchmarks/vs_sklearn.py [--json results.json] [--out field_figures/]

The results, and the commands and commit that made them: BENCHMARKS.md, "Against scikit-learn".
"""

import argparse
import json
import os
import statistics
import time
import warnings

import numpy as np
import torch

import pyro
from pyro.infer.autoguide import AutoNormal
import sklearn
from sklearn.decomposition import PCA, DictionaryLearning, MiniBatchDictionaryLearning, sparse_encode
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from pyro_esc import (AnalyticELBO, EntropyELBO, LocalMultivariateNormal, SparseCoding, encode, fit, gaussian_posterior,
                      held_out_elbo)
from pyro_esc.data import Whitening, bars, image_patches
from pyro_esc.experiments import bars_optimizer
from pyro_esc.metrics import bars_recovery, field_spread
from pyro_esc.training import decaying_adam

# Bars: the standard test of benchmarks/bars_recovery.py.
SIDE, NOISE, SCALE, HIDDEN = 5, 0.3, 1.0, 10
#: The MAP coder of the generating model: alpha = sigma^2 / lambda with lambda = scale * sqrt(side).
COMMON_ALPHA = round(NOISE ** 2 / (SCALE * SIDE ** 0.5), 3)
ALPHAS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
FIRST_SEED = 10
TEST_OFFSET, VALIDATION_OFFSET = 1000, 2000  # data seeds of the held-out sets: s + offset
STEPS = 2000  # pyro_esc on bars: the tuned recipe (experiments.bars_optimizer)
DL_MAX_ITER = 1000  # sklearn's default
MB_EPOCHS, MB_BATCH = 100, 32
HELDOUT_STEPS, HELDOUT_LR = 1000, 0.1

# Patches.
PATCH_N, PATCH_TEST_N, PATCH_SIZE, PATCH_KEEP, PATCH_COMPONENTS = 20000, 1000, 16, 0.9, 100
PATCH_ALPHA = 1.0  # sklearn's image-denoising example (MiniBatchDictionaryLearning, alpha=1, max_iter=10)
PATCH_MB_EPOCHS = 10
PATCH_DL_MAX_ITER = 50
PATCH_STEPS, PATCH_LR = 600, 0.1

DL_NAME = "DictionaryLearning"
MB_NAME = "MiniBatchDictionaryLearning"
PYRO_NAME = "pyro_esc LocalMVN + EntropyELBO"


# ------------------------------------------------------------------------------- shared pieces


def unit_rows(dictionary):
    """Atoms (rows) scaled to unit length; sklearn's may be shorter than 1."""
    dictionary = np.asarray(dictionary, dtype=np.float64)
    return dictionary / np.maximum(np.linalg.norm(dictionary, axis=1, keepdims=True), 1e-300)


def reconstruction_mse(x, codes, dictionary):
    """Mean over points and pixels of (x - codes @ dictionary)^2; dictionary rows are atoms."""
    return float(np.mean((x - codes @ dictionary) ** 2))


def common_coder(x, dictionary, alpha):
    """(MSE, mean nonzeros per point) of x coded on the unit-length atoms by lasso_lars at ``alpha``.

    sparse_encode solves, per point, min_c 1/2 ||x - D^T c||^2 + alpha ||c||_1 (it divides
    alpha by the dimension for LassoLars' 1/(2 n) convention).
    """
    dictionary = unit_rows(dictionary)
    with warnings.catch_warnings():
        # LARS reports dropping a degenerate regressor from the active set; the solution stands.
        warnings.simplefilter("ignore", ConvergenceWarning)
        codes = sparse_encode(x, dictionary, algorithm="lasso_lars", alpha=alpha)
    return reconstruction_mse(x, codes, dictionary), float((codes != 0).sum(1).mean())


def timed_sklearn_fit(estimator, x):
    """Fit, return (seconds, number of ConvergenceWarnings of the inner lasso solver)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        estimator.fit(x)
        seconds = time.perf_counter() - start
    return seconds, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


def sklearn_own_coder(estimator, x):
    """(MSE, mean nonzeros) of x coded by the estimator's own ``transform`` (lasso_lars at its alpha)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        codes = estimator.transform(x)
    return reconstruction_mse(x, codes, estimator.components_), float((codes != 0).sum(1).mean())


def frozen_posterior_mean(model, make_guide, x, steps, lr, seed):
    """Posterior means for new data x with the model's W, lambda, sigma^2 held fixed.

    A fresh guide is fitted to x with AnalyticELBO (the standard ELBO at the model's
    lambda and sigma^2, which EntropyELBO left at Theorem 2's values for the training data)
    in a private param-store scope. ClippedAdam's per-parameter options give the model's
    parameters learning rate 0, so Adam moves them by exactly 0; this is checked
    bit for bit afterwards. For a fixed W the objective is concave in the guide's
    parameters (log-concave posterior), so the result does not depend on initialisation.

    :returns: (means as a float64 numpy array (N, H), ELBO per point, seconds)
    """
    before = [value.detach().clone() for value in (model.dictionary, model.prior_scale, model.noise_var)]
    store = pyro.get_param_store()
    with store.scope():
        pyro.set_rng_seed(seed)
        guide = make_guide(model)
        prefix = guide._pyro_name + "."
        decay = 0.1 ** (1.0 / steps)

        def options(name, _):
            return {"lr": lr if name.startswith(prefix) else 0.0, "lrd": decay, "betas": (0.9, 0.99),
                    "clip_norm": 10.0}

        start = time.perf_counter()
        history = fit(model, guide, x, loss=AnalyticELBO(), steps=steps, optim=pyro.optim.ClippedAdam(options),
                      seed=seed, progress=False, record_every=steps)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            means = gaussian_posterior(guide, x).mean.double().cpu().numpy()
    after = (model.dictionary, model.prior_scale, model.noise_var)
    if not all(torch.equal(a, b.detach()) for a, b in zip(before, after)):
        raise RuntimeError("held-out inference moved the model's parameters; the dictionary must stay fixed")
    return means, history.elbo[-1], seconds


def encoded_posterior_mean(model, x):
    """Held-out posterior means the library's way: ``encode`` (per-point optima, the model fixed).

    :returns: (means as a float64 numpy array (N, H), ELBO per point, seconds)
    """
    with pyro.get_param_store().scope():
        start = time.perf_counter()
        posterior = encode(model, LocalMultivariateNormal(model), x)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            means = gaussian_posterior(posterior, x).mean.double().cpu().numpy()
        return means, held_out_elbo(model, posterior, x), seconds


def short(value):
    """A small MSE legibly: 4 decimals, or scientific notation below 0.001."""
    return f"{value:.4f}" if value >= 1e-3 else f"{value:.1e}"


def mean_and_max(values):
    return statistics.fmean(values), max(values)


# ---------------------------------------------------------------------------------------- bars


def sklearn_estimator(method, alpha, seed, args):
    common = dict(n_components=HIDDEN, alpha=alpha, fit_algorithm="cd", transform_algorithm="lasso_lars",
                  transform_alpha=alpha, random_state=seed)
    if method == DL_NAME:
        return DictionaryLearning(max_iter=args.dl_max_iter, **common)
    # Early stopping off: sklearn's rule (no improvement of the batch cost in 10 batches)
    # stopped after 15 steps with 0 bars on seed 0; a fixed number of epochs instead.
    return MiniBatchDictionaryLearning(max_iter=args.mb_epochs, batch_size=args.mb_batch, tol=0.0,
                                       max_no_improvement=None, **common)


def bars_seed(seed, args):
    """Every method on one seed; returns a list of result rows (plain numbers)."""
    x, true = bars(args.n, side=SIDE, noise=NOISE, scale=SCALE, seed=seed)
    x_test, _ = bars(args.n, side=SIDE, noise=NOISE, scale=SCALE, seed=seed + TEST_OFFSET)
    x_val, _ = bars(args.n, side=SIDE, noise=NOISE, scale=SCALE, seed=seed + VALIDATION_OFFSET)
    train, test, val = (value.double().numpy() for value in (x, x_test, x_val))
    rows = []

    for method in (DL_NAME, MB_NAME):
        for alpha in args.alphas:
            estimator = sklearn_estimator(method, alpha, seed, args)
            seconds, warned = timed_sklearn_fit(estimator, train)
            recovery = bars_recovery(torch.as_tensor(estimator.components_.T), true)
            own_mse, own_nnz = sklearn_own_coder(estimator, test)
            common_mse, common_nnz = common_coder(test, estimator.components_, args.common_alpha)
            val_mse, _ = common_coder(val, estimator.components_, args.common_alpha)
            rows.append({"method": method, "alpha": alpha, "seed": seed, "bars_found": recovery.num_found,
                         "all_found": recovery.all_found, "fit_s": seconds, "iterations": int(estimator.n_iter_),
                         "val_common_mse": val_mse, "test_own_mse": own_mse, "test_own_nnz": own_nnz,
                         "test_common_mse": common_mse, "test_common_nnz": common_nnz,
                         "solver_warnings": warned, "_dictionary": estimator.components_.T.copy()})

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = SparseCoding(x.size(1), HIDDEN)
    start = time.perf_counter()
    guide = LocalMultivariateNormal(model)
    if args.recipe == "defaults":
        history = fit(model, guide, x, loss=EntropyELBO(), seed=seed, progress=False)
    else:
        history = fit(model, guide, x, loss=EntropyELBO(), steps=args.steps, optim=bars_optimizer(guide, args.steps),
                      seed=seed, progress=False, record_every=args.steps)
    seconds = time.perf_counter() - start
    dictionary = model.dictionary.detach().double()
    recovery = bars_recovery(dictionary, true)
    if args.recipe == "defaults":
        means, heldout_elbo, infer_s = encoded_posterior_mean(model, x_test.to(x.dtype))
    else:
        means, heldout_elbo, infer_s = frozen_posterior_mean(model, LocalMultivariateNormal, x_test.to(x.dtype),
                                                              args.heldout_steps, HELDOUT_LR, seed)
    atoms = dictionary.numpy().T
    common_mse, common_nnz = common_coder(test, atoms, args.common_alpha)
    rows.append({"method": PYRO_NAME, "alpha": None, "seed": seed, "bars_found": recovery.num_found,
                 "all_found": recovery.all_found, "fit_s": seconds, "iterations": history.step[-1],
                 "val_common_mse": common_coder(val, atoms, args.common_alpha)[0],
                 "test_own_mse": reconstruction_mse(test, means, atoms), "test_own_nnz": float(HIDDEN),
                 "test_common_mse": common_mse, "test_common_nnz": common_nnz,
                 "elbo": history.elbo[-1], "heldout_elbo": heldout_elbo, "heldout_inference_s": infer_s,
                 "noise_var": history.noise_var[-1], "_dictionary": dictionary.numpy()})

    # References for the common coder only: the true bars, and the span of the data (PCA).
    for name, atoms in (("true dictionary", true.double().numpy().T),
                        ("PCA, 10 components", PCA(HIDDEN, random_state=seed).fit(train).components_)):
        common_mse, common_nnz = common_coder(test, atoms, args.common_alpha)
        rows.append({"method": name, "alpha": None, "seed": seed,
                     "bars_found": bars_recovery(torch.as_tensor(atoms.T), true).num_found,
                     "test_common_mse": common_mse, "test_common_nnz": common_nnz})
    return rows


def summarise(rows, method, alpha):
    chosen = [row for row in rows if row["method"] == method and row["alpha"] == alpha]
    summary = {"method": method, "alpha": alpha, "seeds": len(chosen),
               "all_found": sum(row["all_found"] for row in chosen if "all_found" in row),
               "mean_bars": statistics.fmean(row["bars_found"] for row in chosen),
               "test_common_mse": statistics.fmean(row["test_common_mse"] for row in chosen),
               "test_common_nnz": statistics.fmean(row["test_common_nnz"] for row in chosen)}
    for key in ("val_common_mse", "test_own_mse", "test_own_nnz"):
        if key in chosen[0]:
            summary[key] = statistics.fmean(row[key] for row in chosen)
    if "fit_s" in chosen[0]:
        summary["fit_s_mean"], summary["fit_s_max"] = mean_and_max([row["fit_s"] for row in chosen])
        summary["iterations_mean"] = statistics.fmean(row["iterations"] for row in chosen)
    return summary


def choose_alphas(rows, method, alphas):
    """The method's alpha by each criterion, one alpha for all seeds (means over seeds).

    - "validation MSE": lowest common-coder MSE on the validation set (label-free);
    - "bars found (oracle)": most seeds with all bars, then most bars, then the fastest fit
      (peeks at the truth; of equally good alphas it takes the one that favours sklearn's time).
    """
    summaries = {alpha: summarise(rows, method, alpha) for alpha in alphas}
    label_free = min(alphas, key=lambda a: summaries[a]["val_common_mse"])
    oracle = max(alphas, key=lambda a: (summaries[a]["all_found"], summaries[a]["mean_bars"],
                                        -summaries[a]["fit_s_mean"]))
    return {"validation MSE": label_free, "bars found (oracle)": oracle}, summaries


def run_bars(args):
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows = []
    for seed in seeds:
        seed_rows = bars_seed(seed, args)
        rows.extend(seed_rows)
        for row in seed_rows:
            if "fit_s" in row:
                alpha = "" if row["alpha"] is None else f" alpha {row['alpha']:<5g}"
                print(f"  seed {seed:2d} {row['method'][:31]:31s}{alpha:12s} {row['bars_found']:2d}/10 bars, "
                      f"test MSE own {row['test_own_mse']:.4f} common {row['test_common_mse']:.4f}, "
                      f"{row['fit_s']:6.1f} s, {row['iterations']} it", flush=True)

    sweep, chosen = {}, {}
    for method in (DL_NAME, MB_NAME):
        chosen[method], sweep[method] = choose_alphas(rows, method, args.alphas)
    headline = []
    for method in (DL_NAME, MB_NAME):
        for criterion, alpha in chosen[method].items():
            headline.append(dict(summarise(rows, method, alpha), chosen_by=criterion))
    headline.append(dict(summarise(rows, PYRO_NAME, None), chosen_by="no alpha: lambda, sigma^2 learned"))
    references = [summarise(rows, name, None) for name in ("true dictionary", "PCA, 10 components")]

    n = len(seeds)
    print(f"\nBars ({args.n} training points, {n} seeds {seeds.start}-{seeds.stop - 1}); test MSE per pixel on "
          f"{args.n} held-out points; common coder = lasso_lars at alpha {args.common_alpha}")
    print(f"| {'method':32s} | {'alpha (chosen by)':30s} | all found | mean bars | test MSE, own coder | "
          f"test MSE, common coder (nnz) | fit time mean (max) |")
    print(f"|{'-' * 34}|{'-' * 32}|-----------|-----------|---------------------|"
          f"------------------------------|---------------------|")
    for row in headline:
        alpha = "-" if row["alpha"] is None else f"{row['alpha']:g} ({row['chosen_by']})"
        print(f"| {row['method']:32s} | {alpha:30s} | {row['all_found']:4d}/{n:<4d} | {row['mean_bars']:9.1f} | "
              f"{row['test_own_mse']:19.4f} | {row['test_common_mse']:19.4f} ({row['test_common_nnz']:4.1f})   | "
              f"{row['fit_s_mean']:7.1f} s ({row['fit_s_max']:5.1f} s) |")
    for row in references:
        print(f"| {'reference: ' + row['method']:32s} | {'-':30s} | {'-':>9s} | {row['mean_bars']:9.1f} | "
              f"{'-':>19s} | {row['test_common_mse']:19.4f} ({row['test_common_nnz']:4.1f})   | {'-':>19s} |")

    print("\nThe alpha sweep (means over seeds; val = validation set, common coder):")
    print(f"| {'method':27s} | alpha | all found | mean bars | val MSE | test MSE own (nnz) | "
          f"test MSE common | fit time mean | iterations |")
    print(f"|{'-' * 29}|-------|-----------|-----------|---------|--------------------|"
          f"-----------------|---------------|------------|")
    for method in (DL_NAME, MB_NAME):
        for alpha in args.alphas:
            row = sweep[method][alpha]
            print(f"| {method:27s} | {alpha:5g} | {row['all_found']:4d}/{n:<4d} | {row['mean_bars']:9.1f} | "
                  f"{row['val_common_mse']:7.4f} | {row['test_own_mse']:10.4f} ({row['test_own_nnz']:4.1f}) | "
                  f"{row['test_common_mse']:15.4f} | {row['fit_s_mean']:11.1f} s | {row['iterations_mean']:10.0f} |")
    sweep_s = {method: statistics.fmean(sum(row["fit_s"] for row in rows
                                            if row["method"] == method and row["seed"] == seed) for seed in seeds)
               for method in (DL_NAME, MB_NAME)}
    pyro_rows = [row for row in rows if row["method"] == PYRO_NAME]
    print(f"\nWhole sweep over {len(args.alphas)} alphas, per seed: {DL_NAME} {sweep_s[DL_NAME]:.1f} s, "
          f"{MB_NAME} {sweep_s[MB_NAME]:.1f} s. pyro_esc held-out inference (not in fit time): "
          f"{statistics.fmean(row['heldout_inference_s'] for row in pyro_rows):.1f} s per seed; "
          f"lasso solver ConvergenceWarnings during sklearn fits: "
          f"{sum(row.get('solver_warnings', 0) for row in rows)}.")

    if args.out:
        save_bars_fields(args.out, rows, chosen, seeds.start)
    return {"rows": [public(row) for row in rows], "headline": headline, "references": references,
            "sweep": {method: list(values.values()) for method, values in sweep.items()},
            "chosen_alphas": chosen, "sweep_s_per_seed": sweep_s}


def save_bars_fields(out, rows, chosen, seed):
    import matplotlib.pyplot as plt

    from pyro_esc import plots

    panels = [(method, alpha, criterion) for method in chosen for criterion, alpha in chosen[method].items()]
    panels.append((PYRO_NAME, None, ""))
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.4))
    for ax, (method, alpha, criterion) in zip(np.atleast_1d(axes), panels):
        row = next(r for r in rows if r["method"] == method and r["alpha"] == alpha and r["seed"] == seed)
        label = method if alpha is None else f"{method}\nalpha {alpha:g} ({criterion})"
        plots.plot_fields(row["_dictionary"], shape=(SIDE, SIDE), ncols=5, ax=ax,
                          title=f"{label}\n{row['bars_found']} of 10 bars")
    figure.suptitle(f"Bars, seed {seed}: learned dictionaries", y=1.12)
    plots.save_figure(figure, os.path.join(out, "vs_sklearn_bars_fields.png"))


# ------------------------------------------------------------------------------------- patches


def patch_methods(args):
    """The sklearn configurations on patches: (label, estimator factory)."""
    base = dict(n_components=args.patch_components, alpha=args.patch_alpha, transform_algorithm="lasso_lars",
                transform_alpha=args.patch_alpha, random_state=0)
    methods = [
        (f"MiniBatchDL cd, early stopping (max_iter {args.patch_mb_epochs})",
         lambda: MiniBatchDictionaryLearning(max_iter=args.patch_mb_epochs, fit_algorithm="cd", **base)),
        (f"MiniBatchDL cd, {args.patch_mb_epochs} epochs, no early stopping",
         lambda: MiniBatchDictionaryLearning(max_iter=args.patch_mb_epochs, fit_algorithm="cd", tol=0.0,
                                             max_no_improvement=None, **base)),
        ("MiniBatchDL lars (sklearn's default), early stopping",
         lambda: MiniBatchDictionaryLearning(max_iter=args.patch_mb_epochs, fit_algorithm="lars", **base)),
    ]
    if args.patch_dl_max_iter > 0:
        methods.append((f"{DL_NAME} cd, max_iter {args.patch_dl_max_iter}",
                        lambda: DictionaryLearning(max_iter=args.patch_dl_max_iter, fit_algorithm="cd", **base)))
    return methods


def run_patches(args):
    raw = image_patches(args.patch_n, size=args.patch_size, seed=0)
    raw_test = image_patches(args.patch_test_n, size=args.patch_size, seed=1)
    whitening = Whitening("pca", n_components=args.patch_keep).fit(raw)
    x = whitening.transform(raw)
    x_test = whitening.transform(raw_test)
    train, test = x.double().numpy(), x_test.double().numpy()
    shape = (args.patch_size, args.patch_size)
    print(f"\nPatches: {args.patch_n} training and {args.patch_test_n} held-out {shape[0]}x{shape[1]} patches "
          f"(DC removed), PCA whitening keeping {args.patch_keep:g} of the variance: {whitening.n_kept} "
          f"dimensions; {args.patch_components} atoms for every method", flush=True)

    def spread(atoms):
        return float(field_spread(whitening.fields_to_pixels(torch.as_tensor(atoms).double()), shape).mean())

    results = []
    for label, make in patch_methods(args):
        estimator = make()
        seconds, warned = timed_sklearn_fit(estimator, train)
        own_mse, own_nnz = sklearn_own_coder(estimator, test)
        common_mse, common_nnz = common_coder(test, estimator.components_, args.patch_alpha)
        results.append({"method": label, "fit_s": seconds, "iterations": int(estimator.n_iter_),
                        "steps": int(getattr(estimator, "n_steps_", estimator.n_iter_)),
                        "test_own_mse": own_mse, "test_own_nnz": own_nnz, "test_common_mse": common_mse,
                        "test_common_nnz": common_nnz, "field_spread_px": spread(estimator.components_.T),
                        "solver_warnings": warned, "_dictionary": estimator.components_.T.copy()})
        print(f"  {label}: {seconds:.1f} s", flush=True)

    # pyro_esc: per-point diagonal Gaussians (AutoNormal) + EntropyELBO, full batch.
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = SparseCoding(x.size(1), args.patch_components)
    x = x.float()
    checkpoints = sorted({max(1, round(args.patch_steps * f)) for f in (0.125, 0.25, 0.5, 1.0)})
    curve, evaluation = [], [0.0]

    def evaluate(step, history):
        if step in checkpoints:
            start = time.perf_counter()
            mse, nnz = common_coder(test, model.dictionary.detach().double().numpy().T, args.patch_alpha)
            curve.append({"step": step, "train_s": history.wall_time[-1] - evaluation[0], "elbo": history.elbo[-1],
                          "test_common_mse": mse, "test_common_nnz": nnz})
            evaluation[0] += time.perf_counter() - start

    start = time.perf_counter()
    guide = AutoNormal(model)
    history = fit(model, guide, x, loss=EntropyELBO(), steps=args.patch_steps,
                  optim=decaying_adam(PATCH_LR, args.patch_steps), seed=0, progress=False, callback=evaluate)
    seconds = time.perf_counter() - start - evaluation[0]
    atoms = model.dictionary.detach().double().numpy().T
    means, heldout_elbo, infer_s = frozen_posterior_mean(model, AutoNormal, x_test.float(), args.heldout_steps,
                                                          HELDOUT_LR, 0)
    common_mse, common_nnz = common_coder(test, atoms, args.patch_alpha)
    results.append({"method": f"pyro_esc AutoNormal + EntropyELBO, {args.patch_steps} steps", "fit_s": seconds, "iterations": args.patch_steps,
                    "steps": args.patch_steps, "test_own_mse": reconstruction_mse(test, means, atoms),
                    "test_own_nnz": float(args.patch_components), "test_common_mse": common_mse,
                    "test_common_nnz": common_nnz, "field_spread_px": spread(atoms.T), "elbo": history.elbo[-1],
                    "heldout_elbo": heldout_elbo, "heldout_inference_s": infer_s, "noise_var": history.noise_var[-1],
                    "curve": curve, "_dictionary": atoms.T.copy()})

    print(f"\nPatches: wall time to a dictionary; held-out MSE per whitened dimension ({args.patch_test_n} patches); "
          f"common coder = lasso_lars at alpha {args.patch_alpha:g} (sklearn's training alpha)")
    width = max(len(row["method"]) for row in results)
    print(f"| {'method':{width}s} | fit time | iterations (steps) | test MSE own coder (nnz) | "
          f"test MSE common coder (nnz) | field spread |")
    print(f"|{'-' * (width + 2)}|----------|--------------------|--------------------------|"
          f"-----------------------------|--------------|")
    for row in results:
        print(f"| {row['method']:{width}s} | {row['fit_s']:6.1f} s | {row['iterations']:6d} ({row['steps']:6d})    | "
              f"{short(row['test_own_mse']):>16s} ({row['test_own_nnz']:5.1f}) | "
              f"{row['test_common_mse']:19.4f} ({row['test_common_nnz']:5.1f}) | {row['field_spread_px']:9.2f} px |")
    print("pyro_esc along the way (training time only; common coder): " + "; ".join(
        f"step {point['step']}: {point['train_s']:.1f} s, MSE {point['test_common_mse']:.4f}, "
        f"ELBO/N {point['elbo']:.2f}" for point in curve))
    print(f"pyro_esc: final sigma^2 {history.noise_var[-1]:.4g}; held-out inference {infer_s:.1f} s (not in fit time)")

    if args.out:
        from pyro_esc import plots

        for row in results:
            name = "".join(c if c.isalnum() else "_" for c in row["method"]).strip("_")
            figure = plots.plot_fields(row["_dictionary"], shape=shape, whitening=whitening, order="norm",
                                       title=f"{row['method']}: {args.patch_components} fields, "
                                             f"{row['fit_s']:.1f} s")
            plots.save_figure(figure, os.path.join(args.out, f"vs_sklearn_patches_{name}.png"))
    return {"whitened_dim": whitening.n_kept, "results": [public(row) for row in results]}


# ---------------------------------------------------------------------------------------- main


def warm_up():
    """Run both libraries once on a tiny problem, so one-off costs (lazy imports, first calls) stay out of timings."""
    x, _ = bars(20, side=SIDE, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MiniBatchDictionaryLearning(n_components=HIDDEN, max_iter=1, fit_algorithm="cd").fit(x.double().numpy())
        DictionaryLearning(n_components=HIDDEN, max_iter=1, fit_algorithm="cd").fit(x.double().numpy())
        common_coder(x.double().numpy(), bars(1, side=SIDE)[1].double().numpy().T, COMMON_ALPHA)
    for make_guide in (LocalMultivariateNormal, AutoNormal):
        with pyro.get_param_store().scope():  # one model per scope: they share parameter names
            model = SparseCoding(x.size(1), HIDDEN)
            fit(model, make_guide(model), x, steps=2, progress=False)


def public(row):
    return {key: value for key, value in row.items() if not key.startswith("_")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="number of bars seeds")
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED)
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="sklearn alpha grid (bars)")
    parser.add_argument("--recipe", choices=("defaults", "adam"), default="defaults",
                        help="pyro_esc on bars: fit's defaults and encode (default), or the Adam recipe of "
                             "--steps steps and held-out posteriors by --heldout-steps Adam steps")
    parser.add_argument("--steps", type=int, default=STEPS, help="pyro_esc training steps on bars (--recipe adam)")
    parser.add_argument("--n", type=int, default=1000, help="bars points per set (training, test, validation)")
    parser.add_argument("--common-alpha", type=float, default=COMMON_ALPHA, help="alpha of the common coder (bars)")
    parser.add_argument("--dl-max-iter", type=int, default=DL_MAX_ITER)
    parser.add_argument("--mb-epochs", type=int, default=MB_EPOCHS)
    parser.add_argument("--mb-batch", type=int, default=MB_BATCH)
    parser.add_argument("--heldout-steps", type=int, default=HELDOUT_STEPS, help="pyro_esc held-out inference steps")
    parser.add_argument("--skip-bars", action="store_true")
    parser.add_argument("--skip-patches", action="store_true")
    parser.add_argument("--patch-n", type=int, default=PATCH_N)
    parser.add_argument("--patch-test-n", type=int, default=PATCH_TEST_N)
    parser.add_argument("--patch-size", type=int, default=PATCH_SIZE)
    parser.add_argument("--patch-keep", type=float, default=PATCH_KEEP, help="PCA whitening: variance fraction kept")
    parser.add_argument("--patch-components", type=int, default=PATCH_COMPONENTS)
    parser.add_argument("--patch-alpha", type=float, default=PATCH_ALPHA)
    parser.add_argument("--patch-mb-epochs", type=int, default=PATCH_MB_EPOCHS)
    parser.add_argument("--patch-dl-max-iter", type=int, default=PATCH_DL_MAX_ITER, help="0 skips DictionaryLearning")
    parser.add_argument("--patch-steps", type=int, default=PATCH_STEPS, help="pyro_esc full-batch steps on patches")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--out", default=None, help="folder for field grids (PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    print(f"torch {torch.__version__}, pyro {pyro.__version__}, scikit-learn {sklearn.__version__}; "
          f"1 thread (torch and BLAS/OpenMP via threadpoolctl)", flush=True)
    started = time.perf_counter()
    results = {"settings": vars(args)}
    with threadpool_limits(limits=1):
        warm_up()
        if not args.skip_bars:
            results["bars"] = run_bars(args)
        if not args.skip_patches:
            results["patches"] = run_patches(args)
    results["wall_time_s"] = time.perf_counter() - started
    print(f"\ntotal wall time {results['wall_time_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2, default=float)
    return results


if __name__ == "__main__":
    main()
