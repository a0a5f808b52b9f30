"""What does eliminating lambda and sigma^2 buy? EntropyELBO against AnalyticELBO on the same runs.

Both objectives are closed form and deterministic and have the same optimum (at Theorem 2's
lambda*, sigma^2* the standard ELBO equals L_H, docs/theory.md). They differ in what is optimised:
``EntropyELBO`` optimises the posteriors and the dictionary with lambda, sigma^2 eliminated;
``AnalyticELBO`` also learns lambda and sigma^2 by gradient. Each bars run (5x5, H = 10, N = 1000,
per-point full covariances, one initialisation) is trained by both objectives from the same start,
with L-BFGS to convergence (``fit``'s default) and with the Adam recipe (``--optimizer svi``), and
reports the final exact ELBO per point, bars found, steps and seconds. One core. Run:

    python benchmarks/entropy_vs_analytic.py [--seeds 0 5] [--noise 0.3 0.1] [--out FILE.jsonl] [--no-finish]
    python benchmarks/entropy_vs_analytic.py --summary FILE.jsonl     # only tabulate an earlier run
"""

import argparse
import json
import time

import torch
from records import append_record

from pyro_esc import experiments


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 5], metavar=("FIRST", "STOP"))
    parser.add_argument("--noise", type=float, nargs="+", default=[0.3, 0.1])
    parser.add_argument("--optimizers", nargs="+", default=["lbfgs", "svi"], choices=["lbfgs", "svi"])
    parser.add_argument("--side", type=int, default=5)
    parser.add_argument("--n", type=int, default=1000, help="data points")
    parser.add_argument("--steps", type=int, default=None, help="step limit (default: run_bars')")
    parser.add_argument("--no-finish", action="store_true",
                        help="stop L-BFGS where float32 stalls (fit's finish_in_float64=False), as the README's "
                             "table was measured")
    parser.add_argument("--out", default=None, help="append one JSON line per run")
    parser.add_argument("--summary", default=None, metavar="JSONL", help="only summarise an earlier --out file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.summary is not None:
        rows = [json.loads(line) for line in open(args.summary)]
        summarise(rows)
        return rows
    rows = []
    for noise in args.noise:
        for optimizer in args.optimizers:
            for seed in range(*args.seeds):
                for objective in ("entropy", "analytic"):
                    start = time.perf_counter()
                    result = experiments.run_bars("local-full", objective, n=args.n, side=args.side, noise=noise,
                                                  seed=seed, optimizer=optimizer, n_init=1, steps=args.steps,
                                                  reference=False, progress=False,
                                                  finish_in_float64=not args.no_finish)
                    row = {"noise": noise, "optimizer": optimizer, "seed": seed, "objective": objective,
                           "elbo": result.elbo, "bars": result.bars_found, "steps": result.steps,
                           "time": time.perf_counter() - start}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        append_record(args.out, row)
    summarise(rows)
    return rows


def summarise(rows):
    print("| noise | optimiser | objective | all bars | ELBO/N mean | steps mean | s/run mean |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(r["noise"], r["optimizer"], r["objective"]) for r in rows}, key=lambda k: (-k[0], k[1], k[2]))
    for noise, optimizer, objective in keys:
        runs = [r for r in rows if (r["noise"], r["optimizer"], r["objective"]) == (noise, optimizer, objective)]
        mean = lambda field: sum(r[field] for r in runs) / len(runs)  # noqa: E731
        print(f"| {noise} | {optimizer} | {objective} | {sum(r['bars'] == 10 for r in runs)}/{len(runs)} "
              f"| {mean('elbo'):.4f} | {mean('steps'):.0f} | {mean('time'):.1f} |")


if __name__ == "__main__":
    main()
