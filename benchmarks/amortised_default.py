"""Where the warm start wins: amortised bars runs warm-started and from scratch, over the grid's sizes.

For every bars setting (side x side, H = 2 side, noise sigma, N as in ``bars_grid.py``) and seed,
``run_bars("amortized-full", ...)`` runs twice: with ``warm_start=True`` (:func:`pyro_esc.fit_amortized`
at its defaults, a 1 x 300 encoder with the skip connection) and with ``warm_start=False`` (``fit`` from the
encoder's random initialisation, L-BFGS, the default encoder, 1 x 100 without a skip connection: the path
amortised guides took before). Each
record has the bars found, the amortised ELBO per point on the training data, the held-out gap (the
per-point optimum of 1000 held-out points solved at the learned model, :func:`pyro_esc.solve_posteriors`,
minus the encoder's ELBO there, nats per point) and the wall time of training (one torch thread)::

    python benchmarks/amortised_default.py --sides 4 5 6 8 --noises 0.1 0.3 --seeds 3
    python benchmarks/amortised_default.py --table

Runs already in ``--out`` are skipped; ``--table`` prints the table of what has run. The table and
its reading are in BENCHMARKS.md, "Amortised inference".
"""

import argparse
import json
import os
import statistics
import time
import warnings

import torch

from records import append_record, read_records

OUT = os.path.join(os.path.dirname(__file__), "results", "amortised_default.jsonl")
HELD_OUT_SEED = 10_000
METHODS = ("warm", "scratch")


def data_n(side, n=None):
    return n or (2000 if side >= 8 else 1000)  # as bars_grid.py


def run_one(method, side, noise, seed, n=None, steps=None):
    import pyro
    from pyro_esc import held_out_elbo, solve_posteriors
    from pyro_esc.data import bars
    from pyro_esc.experiments import run_bars

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    pyro.clear_param_store()
    n = data_n(side, n)
    started = time.perf_counter()
    result = run_bars("amortized-full", n=n, side=side, noise=noise, seed=seed, warm_start=method == "warm",
                      steps=steps, progress=False, reference=False)
    seconds = time.perf_counter() - started
    x_test, _ = bars(1000, side=side, noise=noise, seed=seed + HELD_OUT_SEED)
    optimum = float(solve_posteriors(result.model, x_test, "full").elbo.mean())
    return dict(method=method, side=side, noise=noise, seed=seed, n=n, bars_found=result.bars_found,
                n_bars=2 * side, all_found=bool(result.all_bars_found), elbo=result.elbo,
                gap_test=optimum - held_out_elbo(result.model, result.guide_object, x_test),
                hidden=result.hidden, skip=result.guide_object.skip, wall_s=round(seconds, 1))



def table(records):
    groups = {}
    for record in records:
        groups.setdefault((record["side"], record["noise"], record["method"]), []).append(record)
    lines = ["| bars | noise | method | seeds | all bars | mean bars | ELBO/N | held-out gap | time/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (side, noise, method), rows in sorted(groups.items()):
        mean = lambda key: statistics.mean(row[key] for row in rows)  # noqa: E731
        encoder = f"1 x {rows[0]['hidden'][0]}" + (", skip" if rows[0]["skip"] else "")
        lines.append(f"| {side}x{side} | {noise:g} | {method} ({encoder}) | {len(rows)} | "
                     f"{sum(row['all_found'] for row in rows)}/{len(rows)} | {mean('bars_found'):.1f} of "
                     f"{rows[0]['n_bars']} | {mean('elbo'):.3f} | {mean('gap_test'):.4f} | {mean('wall_s'):.0f} s |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="+", type=int, default=[4, 5, 6, 8])
    parser.add_argument("--noises", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--n", type=int, default=None, help="training points (default 1000, 2000 from side 8)")
    parser.add_argument("--steps", type=int, default=None, help="step limit of every stage (default: run_bars's)")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--table", action="store_true", help="only print the table of what has run")
    args = parser.parse_args(argv)
    if not args.table:
        done = {(r["method"], r["side"], r["noise"], r["seed"]) for r in read_records(args.out)}
        for side in args.sides:
            for noise in args.noises:
                for seed in range(args.seeds):
                    for method in args.methods:
                        if (method, side, noise, seed) in done:
                            continue
                        record = run_one(method, side, noise, seed, args.n, args.steps)
                        append_record(args.out, record)
                        print(json.dumps(record), flush=True)
    text = table(read_records(args.out))
    print(text)
    return text


if __name__ == "__main__":
    main()
