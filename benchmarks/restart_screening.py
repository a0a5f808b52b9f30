"""Can restarts be screened early? Each initialisation of the paper's bars setting, run to the end.

For seeds and initialisations (init seed = seed + restart, as ``fit(n_init=k)`` numbers them), the
paper's setting (5x5 bars, sigma 0.1, N = 1000, H = 10, per-point full covariances, L-BFGS to
convergence) is trained once per initialisation; each run records its exact ELBO per point after
25 ... 400 steps, its final ELBO, the bars found, steps and time. From these, what ``n_init = 1, 2,
3`` would keep (the best final ELBO), and whether the ELBO after a few hundred steps already names
the initialisation that ends best. One core. Run:

    python benchmarks/restart_screening.py [--seeds 0 10] [--out benchmarks/results/restart_screening.jsonl]
"""

import argparse
import json
import time

import torch

from pyro_esc import experiments

CHECKPOINTS = (25, 50, 100, 150, 200, 300, 400)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 10], metavar=("FIRST", "STOP"))
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--out", default=None, help="append one JSON line per run")
    parser.add_argument("--summary", default=None, metavar="JSONL", help="only summarise an earlier --out file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [] if args.summary is None else [json.loads(line) for line in open(args.summary)]
    if args.summary is None:
        for seed in range(*args.seeds):
            for restart in range(args.restarts):
                start = time.perf_counter()
                result = experiments.run_bars("local-full", "entropy", n=1000, side=5, noise=0.1, seed=seed,
                                              init_seed=seed + restart, n_init=1, reference=False, progress=False)
                elbos = result.history.elbo
                row = {"seed": seed, "restart": restart, "final": result.elbo, "bars": result.bars_found,
                       "steps": result.steps, "time": time.perf_counter() - start,
                       "traj": {str(s): elbos[s - 1] for s in CHECKPOINTS if s <= len(elbos)}}
                rows.append(row)
                if args.out:
                    with open(args.out, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
    summarise(rows, args.restarts)
    return rows


def summarise(rows, restarts):
    by_seed = {}
    for row in rows:
        by_seed.setdefault(row["seed"], []).append(row)
    print("| n_init | seeds with all 10 bars | mean time per seed (s) |")
    print("|---|---|---|")
    for k in range(1, restarts + 1):
        kept = [max(sorted(runs, key=lambda r: r["restart"])[:k], key=lambda r: r["final"]) for runs in by_seed.values()]
        seconds = [sum(r["time"] for r in sorted(runs, key=lambda r: r["restart"])[:k]) for runs in by_seed.values()]
        print(f"| {k} | {sum(r['bars'] == 10 for r in kept)} of {len(kept)} | {sum(seconds) / len(seconds):.1f} |")
    for checkpoint in ("200", "400"):
        agree = sum(max(runs, key=lambda r: r["traj"].get(checkpoint, float("-inf")))["restart"]
                    == max(runs, key=lambda r: r["final"])["restart"] for runs in by_seed.values())
        print(f"the best ELBO after {checkpoint} steps names the best final run in {agree} of {len(by_seed)} seeds")


if __name__ == "__main__":
    main()
