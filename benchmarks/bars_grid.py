"""Bars recovery over sizes, noise levels and seeds: how `fit`'s defaults were chosen.

For every setting (side x side bars, H = 2 side latents, Laplace(1) amplitudes, noise sigma;
N = 1000, 2000 for side 8) and seed, `pyro_esc.experiments.run_bars` learns from one
initialisation with its defaults for the family (L-BFGS on the exact EntropyELBO until convergence
for full covariances, the ClippedAdam recipe for diagonal and amortised posteriors; family
``amortized-warm``: the amortised full-covariance encoder trained by `pyro_esc.fit_amortized`,
``run_bars(warm_start=True)``) and fits the posteriors at the generating dictionary for the
reference ELBO. The table reports, per setting and posterior family:

- all bars: seeds (of those run) on which every bar was found (optimal matching, cosine > 0.95);
- learned - reference: mean over seeds of the learned ELBO minus the reference ELBO, per data point
  (>= 0: the learned dictionary explains the data at least as well as the generating one);
- time/run: mean training wall time in seconds (the reference fit not included).

With ``--inits K`` every data seed is also trained from K initialisations (init seeds seed, seed + 1,
...): the table then shows ``n_init = k`` for k = 1 .. K as fit's restarts would pick it, the run with
the best final ELBO among the first k, and its time is the sum of their times.

The reference ELBO of each data set is computed once, in float64, by a separate pass
(``--references``; `pyro_esc.evaluation.reference_elbo`) into ``bars_grid.references.jsonl`` in
the folder of ``--out``: it depends on the data set only, so every results file of that folder
shares it. The table uses it wherever it exists (else the reference the run recorded).

Every finished run is appended to a JSON-lines file at once (``--out``), so a long grid can be
stopped and resumed (runs already in the file are skipped) and tabulated at any time. The
full-covariance runs in ``bars_grid.jsonl`` were made before ``fit`` went on in float64 where
float32 stalls (``--no-finish`` repeats them); those in ``bars_grid_finish.jsonl`` with that finish
but fit's earlier convergence test and step limit (``--tol 1e-6 --steps 5000``); those in
``bars_grid_tol1e-7.jsonl`` with fit's defaults since (tol 1e-7, step limit 20000)::

    python benchmarks/bars_grid.py --jobs 2 --out benchmarks/results/bars_grid_tol1e-7.jsonl   # full covariances
    python benchmarks/bars_grid.py --families diag          # and --families amortized --seeds 3
    python benchmarks/bars_grid.py --families amortized-warm --seeds 3 --out benchmarks/results/bars_grid_warm.jsonl
    python benchmarks/bars_grid.py --references             # reference ELBOs of every data set that ran
    python benchmarks/bars_grid.py --table                  # the table of what has run

One torch thread per run; ``--jobs 2`` runs two settings side by side.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from records import append_record, read_records

SIDES = (4, 5, 6, 8)
NOISES = (0.05, 0.1, 0.3, 0.5)
FAMILIES = {"full": "local-full", "diag": "local-diag", "amortized": "amortized-full",
            "amortized-warm": "amortized-full"}
#: Families trained by pyro_esc.fit_amortized (run_bars(warm_start=True)) instead of run_bars's default.
WARM_STARTED = ("amortized-warm",)


def run_one(job):
    """Train one (family, side, noise, seed) and return its JSON record."""
    import warnings

    import torch

    from pyro_esc.experiments import run_bars

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # an unconverged run is in its record (stop_reason)
    family, side, noise, seed, init, n, steps, dtype, finish, tol = job
    started = time.perf_counter()
    result = run_bars(FAMILIES[family], n=n, side=side, noise=noise, seed=seed, steps=steps, progress=False,
                      init_seed=seed + init, reference=False, n_init=1, dtype=getattr(torch, dtype),
                      finish_in_float64=finish, tol=tol, warm_start=family in WARM_STARTED)
    record = {key: value for key, value in result.metrics().items() if key != "cosines"}
    record.update(family=family, tol=tol, step_limit=steps, total_time_s=round(time.perf_counter() - started, 2))
    return record



def data_n(side, n=None):
    return n or (2000 if side >= 8 else 1000)


def reference_one(setting):
    """The float64 reference ELBO of one data set (side, noise, seed, n)."""
    import warnings

    import torch

    from pyro_esc.data import bars
    from pyro_esc.evaluation import reference_elbo

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    side, noise, seed, n = setting
    x, dictionary = bars(n, side=side, noise=noise, seed=seed)
    started = time.perf_counter()
    value = reference_elbo(x, dictionary, seed=seed)
    return {"side": side, "noise": noise, "seed": seed, "n": n, "reference_elbo": value,
            "time_s": round(time.perf_counter() - started, 2)}


def reference_path(out):
    """The references file beside ``out``, one per folder: a reference depends on the data set only."""
    return os.path.join(os.path.dirname(os.path.abspath(out)), "bars_grid.references.jsonl")


def references(path):
    """{(side, noise, seed, n): reference ELBO} from a references file."""
    return {(r["side"], r["noise"], r["seed"], r["n"]): r["reference_elbo"] for r in read_records(path)}


def with_references(records, known):
    """The records with the separate (float64) reference and the gap to it, where known."""
    updated = []
    for r in records:
        reference = known.get((r["side"], r["noise"], r["seed"], r["n"]), r.get("reference_elbo"))
        gap = None if reference is None else r["elbo"] - reference
        updated.append(dict(r, reference_elbo=reference, elbo_minus_reference=gap))
    return updated


def key(record):
    return record["family"], record["side"], record["noise"], record["seed"], record["init_seed"] - record["seed"]


def restarts(records, family, side, noise, k):
    """Per data seed, what fit(n_init=k) keeps: the best final ELBO of inits 0 .. k-1 (and their total time)."""
    by_seed = {}
    for r in records:
        if (r["family"], r["side"], r["noise"]) == (family, side, noise) and r["init_seed"] - r["seed"] < k:
            by_seed.setdefault(r["seed"], []).append(r)
    kept = []
    for seed, runs in sorted(by_seed.items()):
        if len(runs) < k:
            continue  # not every init of this seed has run yet
        reference = next(r["reference_elbo"] for r in runs if r["init_seed"] == r["seed"])
        if reference is None:
            continue  # no reference yet for this data set
        best = max(runs, key=lambda r: r["elbo"])
        kept.append(dict(best, reference_elbo=reference, elbo_minus_reference=best["elbo"] - reference,
                         wall_time_s=sum(r["wall_time_s"] for r in runs)))
    return kept


def table(records):
    """The README's table: one row per setting and n_init, one column group per family."""
    families = [f for f in FAMILIES if any(r["family"] == f for r in records)]
    inits = max((r["init_seed"] - r["seed"] for r in records), default=0) + 1
    header = "| side | sigma | n_init | " + " | ".join(f"{f}: all bars | {f}: learned - ref, mean (min) | {f}: s/run"
                                                     for f in families)
    lines = [header + " |", "|" + "---|" * (3 + 3 * len(families))]
    settings = sorted({(r["side"], r["noise"]) for r in records})
    for side, noise in settings:
        for k in range(1, inits + 1):
            cells = []
            for family in families:
                runs = restarts(records, family, side, noise, k)
                if not runs:
                    cells += ["-", "-", "-"]
                    continue
                found = sum(r["all_bars_found"] for r in runs)
                gaps = [r["elbo_minus_reference"] for r in runs]
                cells += [f"{found}/{len(runs)}", f"{sum(gaps) / len(gaps):+.4f} ({min(gaps):+.4f})",
                          f"{sum(r['wall_time_s'] for r in runs) / len(runs):.1f}"]
            lines.append(f"| {side} | {noise} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["full"])
    parser.add_argument("--sides", nargs="+", type=int, default=list(SIDES))
    parser.add_argument("--noises", nargs="+", type=float, default=list(NOISES))
    parser.add_argument("--seeds", type=int, default=10, help="data seeds 0 .. SEEDS-1 (default 10)")
    parser.add_argument("--inits", type=int, default=1, help="initialisations per data seed (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--n", type=int, default=None, help="data points (default 1000, 2000 for side 8)")
    parser.add_argument("--steps", type=int, default=None, help="step limit (default: fit's)")
    parser.add_argument("--tol", type=float, default=None,
                        help="fit's convergence tolerance on the L-BFGS route (default: fit's); use another --out")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of data, model and guide (default float32); use another --out per dtype")
    parser.add_argument("--no-finish", action="store_true",
                        help="stop L-BFGS where float32 stalls (fit's finish_in_float64=False), as runs did "
                             "before the float64 finish; use another --out")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "bars_grid.jsonl"))
    parser.add_argument("--table", action="store_true", help="only print the table of the runs in --out")
    parser.add_argument("--references", action="store_true",
                        help="compute the missing float64 reference ELBOs of the data sets in --out (those "
                             "of --sides and --noises)")
    args = parser.parse_args(argv)
    if args.table:
        records = with_references(read_records(args.out), references(reference_path(args.out)))
        print(table(records))
        return records
    if args.references:
        known = references(reference_path(args.out))
        settings = sorted({(r["side"], r["noise"], r["seed"], r["n"]) for r in read_records(args.out)
                           if r["side"] in args.sides and r["noise"] in args.noises} - set(known))
        print(f"{len(settings)} reference ELBOs to compute", file=sys.stderr)
        for record in map(reference_one, settings):
            append_record(reference_path(args.out), record)
        return references(reference_path(args.out))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    done = {key(r) for r in read_records(args.out)}
    # Cheap settings first, so that a stopped grid has covered the most settings.
    tol = "auto" if args.tol is None else args.tol
    jobs = [(family, side, noise, seed, init, data_n(side, args.n), args.steps, args.dtype, not args.no_finish, tol)
            for family in args.families for side in sorted(args.sides) for noise in args.noises
            for seed in range(args.seeds) for init in range(args.inits)]
    jobs = [job for job in jobs if job[:5] not in done]
    print(f"{len(jobs)} runs to go ({len(done)} already in {args.out})", file=sys.stderr)
    pool = ProcessPoolExecutor(max_workers=args.jobs) if args.jobs > 1 else None
    for record in (pool.map(run_one, jobs) if pool else map(run_one, jobs)):
        append_record(args.out, record)
        print(f"{record['family']} side {record['side']} sigma {record['noise']} seed {record['seed']} init "
              f"{record['init_seed']}: {record['bars_found']} bars, ELBO {record['elbo']:.4f}, "
              f"{record['wall_time_s']:.1f} s", file=sys.stderr, flush=True)
    if pool is not None:
        pool.shutdown()
    records = with_references(read_records(args.out), references(reference_path(args.out)))
    print(table(records))
    return records


if __name__ == "__main__":
    main()
