"""Learning natural-image fields at the paper's scale: which minibatch route, measured by what it learns.

Whitened natural image patches (``pyro_esc.experiments.patch_data``), H = 100 latents,
per-point diagonal posteriors (AutoNormal), EntropyELBO, minibatches of 512, 10 epochs. Every
run is one subprocess (so its peak resident memory is its own) and appends one JSON line to
``benchmarks/results/learning_at_scale.jsonl``:

- the exact full-data ELBO per patch of the returned model and guide (``History.final_elbo``);
- the median field spread in pixels (uniform energy over a 16x16 patch is 6.52 px, 4.88 px over
  12x12: fields with no spatial structure; ``UNIFORM_SPREAD``) and the kurtosis of the posterior means;
- fit's wall time (data preparation apart) and the process's peak memory.

Routes (``--routes``), each a name with options after colons:

- ``em`` (``fit``'s EM route, the default for this guide on minibatches), ``em:chunk=10240``,
  ``em:momentum=0``;
- ``rowwise`` (the row-wise route at its defaults), ``rowwise:lr=0.02:inner=16``;
- ``full`` (the full-batch reference: 1500 Adam steps on every posterior and the dictionary,
  ``pyro-esc patches --n N --size S --latents 100``; for small N only).

Run, one process per core::

    python benchmarks/learning_at_scale.py --n 204800 --size 16 --routes em rowwise [--annealing default]
    python benchmarks/learning_at_scale.py --table
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from records import append_record, read_records

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "learning_at_scale.jsonl")
UNIFORM_SPREAD = {12: 4.88, 16: 6.52}


def parse_route(text):
    """``"em:chunk=10240"`` -> ("em", {"chunk": 10240}); values are ints or floats."""
    name, *options = text.split(":")
    if name not in ("em", "rowwise", "full"):
        raise ValueError(f"route must be em, rowwise or full (with :key=value options), got {text!r}")
    parsed = {}
    for option in options:
        key, _, value = option.partition("=")
        parsed[key] = float(value) if "." in value or "e" in value else int(value)
    return name, parsed


def run_one(args):
    import torch

    torch.set_num_threads(args.threads)
    import pyro

    from pyro_esc.em import EM
    from pyro_esc.experiments import patch_data, run_patches

    name, options = parse_route(args.child)
    started = time.perf_counter()
    x, whitening = patch_data(args.n, args.size, args.seed)
    data_time = time.perf_counter() - started
    annealing = None if args.annealing == "none" else args.annealing
    common = dict(guide="local-diag", n_latents=100, seed=args.seed, progress=False, annealing=annealing)
    settings = {}
    if name == "em":
        em = EM(chunk=options.get("chunk"), momentum=options.get("momentum"))
        chunk = em.chunk_for(x.size(0), args.batch)
        settings = {"chunk": chunk, "momentum": em.momentum_for(chunk, x.size(0))}
        result = run_patches(x, whitening, args.size, epochs=args.epochs, batch_size=args.batch, optimizer=em,
                             **common)
    elif name == "rowwise":
        result = run_patches(x, whitening, args.size, epochs=args.epochs, batch_size=args.batch,
                             optimizer="rowwise", lr=options.get("lr"), inner_steps=options.get("inner"), **common)
    else:
        result = run_patches(x, whitening, args.size, steps=options.get("steps", 1500), lr=0.05, **common)
    pyro.clear_param_store()
    record = {"route": name if name == "em" else args.child, **settings, "n": args.n, "size": args.size, "annealing": args.annealing,
              "epochs": None if name == "full" else args.epochs, "batch": None if name == "full" else args.batch,
              "threads": args.threads, "seed": args.seed, "elbo": result.elbo,
              "median_spread_px": result.median_field_spread_px, "kurtosis": result.sparseness["kurtosis"],
              "fit_s": result.wall_time_s, "data_s": round(data_time, 1),
              "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(record))


def label(record):
    """The route with its settings; EM's chunk and momentum as the run used them (** marks fit's defaults)."""
    if record["route"] != "em":
        return record["route"]
    from pyro_esc.em import EM

    em = EM()
    default_chunk = em.chunk_for(record["n"], record["batch"])
    default = (record["chunk"] == default_chunk
               and record["momentum"] == em.momentum_for(default_chunk, record["n"]))
    text = f"em, chunk {record['chunk']}, momentum {record['momentum']:g}"
    return f"**{text}**" if default else text


def table(path=RESULTS):
    records = read_records(path)
    print("| N | size | annealing | route (** fit's default) | epochs | seed | threads | ELBO per patch | "
          "median spread (px) | kurtosis | fit (s) | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(records, key=lambda r: (r["n"], r["size"], r["annealing"], r["route"], r.get("chunk") or 0,
                                            r.get("momentum") or 0, r["epochs"] or 0, r["seed"], r["threads"])):
        print(f"| {r['n']:,} | {r['size']} | {r['annealing']} | {label(r)} | {r['epochs'] or '-'} | {r['seed']} | "
              f"{r['threads']} | {r['elbo']:.3f} | {r['median_spread_px']:.2f} | {r['kurtosis']:.1f} | "
              f"{r['fit_s']:.0f} | {r['peak_mib']} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=204800)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--routes", nargs="+", default=["em"])
    parser.add_argument("--annealing", default="none", choices=("none", "default", "authors"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS, help="JSON lines file to append to")
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        return table(args.out)
    if args.child is not None:
        return run_one(args)
    for route in args.routes:
        parse_route(route)
        command = [sys.executable, os.path.abspath(__file__), "--child", route] + [
            f"--{key}={value}" for key, value in (("n", args.n), ("size", args.size), ("annealing", args.annealing),
                                                   ("epochs", args.epochs), ("batch", args.batch),
                                                   ("threads", args.threads), ("seed", args.seed))]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        record = output.strip().splitlines()[-1]
        print(record, flush=True)
        append_record(args.out, json.loads(record))


if __name__ == "__main__":
    main()
