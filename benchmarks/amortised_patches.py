"""Amortised inference on natural image patches at the paper's scale: the warm-started encoder.

The paper's natural-image setting (204,800 ZCA-whitened 16x16 patches, H = 100, minibatches of 512,
10 epochs), twice: without annealing and with ``annealing="default"``. Each run is
:func:`pyro_esc.fit_amortized`'s default path in two visible halves:

1. **per-point**: per-point diagonal posteriors learn the model (``run_patches(guide="local-diag")``, fit's
   EM route; what ``fit_amortized(..., dictionary_guide="local-diag", batch_size=512, epochs=10)`` runs as
   its dictionary stage);
2. **amortised**: a diagonal :class:`~pyro_esc.AmortizedNormal` (one hidden layer of 500 units, the
   patches encoder of ``run_patches``, and the skip connection) trained on that model by ``fit_amortized(model, encoder, x,
   learn_dictionary=False)``: matched by least squares to per-point optima solved at the model, then
   trained alone on points drawn from the model and rows of the data.

So the per-point and the amortised run of one annealing setting share their model, and so their fields:
what differs is how a patch is encoded (the solver or the encoder). Reported per run: the exact ELBO per
patch on the training patches of the per-point posteriors and of the encoder (after the match and at the
end), the **held-out gap** per patch (``--test`` patches cut with another seed and whitened by the
training whitening: their per-point optimum solved at the model, :func:`pyro_esc.solve_posteriors`,
minus the encoder's ELBO), the median field spread, the kurtosis of the codes (posterior means), and
times: the per-point fit, the encoder's stages, and encoding the held-out patches by the solver and by
the encoder (one torch thread unless ``--threads``). ``--figures DIR`` draws the optimisation curves
and the fields of the four runs::

    python benchmarks/amortised_patches.py --figures figures
    python benchmarks/amortised_patches.py --table

Records are appended to ``benchmarks/results/amortised_patches.jsonl``.
"""

import argparse
import json
import os
import time

from records import append_record, read_records

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "amortised_patches.jsonl")


def patches(args):
    """(training patches, their whitening, held-out patches): ``--test`` patches cut with the next seed,
    whitened by the training whitening."""
    from pyro_esc.data import image_patches
    from pyro_esc.experiments import patch_data

    x, whitening = patch_data(args.n, args.size, args.seed)
    x_test = whitening.transform(image_patches(args.test, size=args.size, seed=args.seed + 1)).float()
    return x, whitening, x_test


def run(args, annealing):
    import pyro
    import torch

    from pyro_esc import AmortizedNormal, fit_amortized, held_out_elbo, solve_posteriors
    from pyro_esc.experiments import PATCH_ENCODER_HIDDEN, run_patches
    from pyro_esc.metrics import code_sparseness, field_spread

    pyro.clear_param_store()
    x, whitening, x_test = patches(args)
    per_point = run_patches(x, whitening, args.size, guide="local-diag", n_latents=args.latents, epochs=args.epochs,
                            batch_size=args.batch, annealing=annealing, seed=args.seed, progress=False)
    model = per_point.model
    encoder = AmortizedNormal(x.size(1), args.latents, hidden=PATCH_ENCODER_HIDDEN, covariance="diag", skip=True)
    started = time.perf_counter()
    stages = fit_amortized(model, encoder, x, learn_dictionary=False, seed=args.seed, progress=False,
                           **({"sample_steps": args.sample_steps} if args.sample_steps is not None else {}))
    encoder_seconds = time.perf_counter() - started
    started = time.perf_counter()
    solved = solve_posteriors(model, x_test, "diag")
    solve_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        encoder.gaussian_posterior(x_test)
    encode_seconds = time.perf_counter() - started
    optimum = float(solved.elbo.mean())
    spreads = field_spread(whitening.fields_to_pixels(model.dictionary.detach().double()), (args.size, args.size))
    record = dict(n=args.n, size=args.size, latents=args.latents, epochs=args.epochs, batch=args.batch,
                  seed=args.seed, annealing=annealing or "none", threads=args.threads,
                  per_point_elbo=per_point.elbo, match_elbo=stages.match_elbo, amortised_elbo=stages.final_elbo,
                  test_optimum=optimum, test_encoder=held_out_elbo(model, encoder, x_test),
                  median_spread_px=float(spreads.median()),
                  kurtosis_per_point=per_point.sparseness["kurtosis"],
                  kurtosis_encoder=code_sparseness(encoder.gaussian_posterior(x).mean.detach())["kurtosis"],
                  per_point_fit_s=per_point.wall_time_s, encoder_s=round(encoder_seconds, 1),
                  sample_steps=stages.steps["samples"], test_points=args.test,
                  solve_test_s=round(solve_seconds, 2), encode_test_s=round(encode_seconds, 3))
    record["test_gap"] = record["test_optimum"] - record["test_encoder"]
    record["method"] = "warm"
    return record, per_point, stages, whitening


def scratch(args, annealing):
    """The encoder and the model trained together from the encoder's initialisation (run_patches, fit's SVI route).

    The encoder is run_patches's (1 x 500, diagonal, no skip connection): the path amortised patches took before.
    """
    import pyro
    import torch

    from pyro_esc import held_out_elbo, solve_posteriors
    from pyro_esc.experiments import run_patches

    pyro.clear_param_store()
    x, whitening, x_test = patches(args)
    result = run_patches(x, whitening, args.size, guide="amortized-diag", n_latents=args.latents, epochs=args.epochs,
                         batch_size=args.batch, annealing=annealing, seed=args.seed, progress=False)
    with torch.no_grad():
        optimum = float(solve_posteriors(result.model, x_test, "diag").elbo.mean())
    encoder_elbo = held_out_elbo(result.model, result.guide_object, x_test)
    return dict(n=args.n, size=args.size, latents=args.latents, epochs=args.epochs, batch=args.batch, seed=args.seed,
                annealing=annealing or "none", threads=args.threads, method="scratch", amortised_elbo=result.elbo,
                test_optimum=optimum, test_encoder=encoder_elbo, test_gap=optimum - encoder_elbo,
                median_spread_px=result.median_field_spread_px, kurtosis_encoder=result.sparseness["kurtosis"],
                fit_s=result.wall_time_s, test_points=args.test)


def figures(out, runs, size, whitening):
    import matplotlib.pyplot as plt
    import numpy as np

    from pyro_esc import plots

    def running_mean(values, window):
        return np.convolve(values, np.ones(window) / window, mode="valid")

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    lows, highs = [], []
    for (annealing, (record, per_point, stages)), color in zip(runs.items(), ("C0", "C1")):
        history = per_point.history
        label = "annealed" if annealing else "not annealed"
        # Batch estimates change with every minibatch: a running mean over a fortieth of the run.
        window = max(1, len(history.elbo) // 40)
        smoothed = running_mean(history.elbo, window)
        left.plot(history.epoch[window - 1:], smoothed, color=color, label=f"{label}: batch ELBO, running mean")
        end = history.epoch[-1]
        left.plot([end], [record["per_point_elbo"]], "o", color=color, label=f"{label}: per-point posteriors (exact)")
        left.plot([end], [record["match_elbo"]], "s", color=color, label=f"{label}: encoder after the match (exact)")
        left.plot([end], [record["amortised_elbo"]], "x", color=color, markersize=9,
                  label=f"{label}: encoder at the end (exact)")
        lows += [float(np.percentile(smoothed[len(smoothed) // 5:], 2)), record["match_elbo"]]
        highs += [float(smoothed.max()), record["per_point_elbo"]]
        samples = stages.samples
        window = max(1, len(samples.elbo) // 40)
        right.plot(samples.step[window - 1:], running_mean(samples.elbo, window), color=color,
                   label=f"{label}: batch ELBO, running mean")
    left.set_xlabel("epoch of the per-point (EM) training")
    left.set_ylabel("ELBO per patch (training patches)")
    left.set_title("The model (per-point posteriors, EM); exact ELBOs at the end")
    left.set_ylim(min(lows) - 1, max(highs) + 1)
    right.set_xlabel("Adam step of the encoder stage (model fixed)")
    from pyro_esc.warm_start import DEFAULT_MODEL_SAMPLES

    # fit_amortized's batch: its model points and a ninth as many rows of the data (model_samples // 9)
    right.set_ylabel(f"ELBO per point ({DEFAULT_MODEL_SAMPLES} drawn from the model + "
                     f"{DEFAULT_MODEL_SAMPLES // 9} patches)")
    right.set_title("The encoder's objective: points drawn afresh at every step")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    plots.save_figure(fig, os.path.join(out, "paper_scale_amortised_curves.png"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.4), layout="constrained")
    for ax, (annealing, (record, per_point, _)) in zip(axes, runs.items()):
        title = (f"{'annealed' if annealing else 'not annealed'}: per-point and amortised (one model)\n"
                 f"median spread {record['median_spread_px']:.2f} px; held-out gap {record['test_gap']:.2f} nats/patch")
        plots.plot_fields(per_point.dictionary, shape=(size, size), whitening=whitening, title=title,
                          caption=False, ax=ax)
    plots.save_figure(fig, os.path.join(out, "paper_scale_amortised_fields.png"))



def table(records):
    lines = ["| N | size | annealing | seed | per-point ELBO | encoder ELBO (after match) | held-out gap | median spread "
             "| kurtosis per-point / encoder | per-point fit | encoder | encode held-out: solver / encoder |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("method") == "scratch":
            lines.append(f"| {r['n']:,} | {r['size']} | {r['annealing']} | {r['seed']} | - (from scratch) | "
                         f"{r['amortised_elbo']:.2f} | {r['test_gap']:.2f} | {r['median_spread_px']:.2f} px | "
                         f"- / {r['kurtosis_encoder']:.0f} | - | {r['fit_s']:.0f} s (with the model) | - |")
            continue
        lines.append(f"| {r['n']:,} | {r['size']} | {r['annealing']} | {r['seed']} | {r['per_point_elbo']:.2f} | "
                     f"{r['amortised_elbo']:.2f} ({r['match_elbo']:.2f}) | {r['test_gap']:.2f} | "
                     f"{r['median_spread_px']:.2f} px | {r['kurtosis_per_point']:.0f} / {r['kurtosis_encoder']:.0f} | "
                     f"{r['per_point_fit_s']:.0f} s | {r['encoder_s']:.0f} s | "
                     f"{r['solve_test_s']:.2f} s / {r['encode_test_s']:.3f} s ({r['test_points']:,}) |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=204800)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--latents", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--test", type=int, default=10000, help="held-out patches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--annealing", nargs="+", default=["none", "default"], choices=["none", "default"])
    parser.add_argument("--sample-steps", type=int, default=None, help="fit_amortized's sample_steps (default its own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scratch", action="store_true",
                        help="instead: the encoder and model trained together from scratch (run_patches, SVI route)")
    parser.add_argument("--figures", default=None, help="folder for the curves and fields figures")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--table", action="store_true", help="only print the table of what has run")
    args = parser.parse_args(argv)
    if not args.table:
        import torch

        torch.set_num_threads(args.threads)
        runs = {}
        for name in args.annealing:
            annealing = None if name == "none" else name
            if args.scratch:
                record = scratch(args, annealing)
                append_record(args.out, record)
                print(json.dumps(record), flush=True)
                continue
            record, per_point, stages, whitening = run(args, annealing)
            runs[annealing] = (record, per_point, stages)
            append_record(args.out, record)
            print(json.dumps(record), flush=True)
        if args.figures and runs:
            figures(args.figures, runs, args.size, whitening)
    text = table(read_records(args.out))
    print(text)
    return text


if __name__ == "__main__":
    main()
