"""Which amortised encoder for the natural-patch experiment of ``pyro-esc reproduce``.

Every configuration is trained exactly as ``reproduce`` trains its amortised runs
(:func:`pyro_esc.experiments.run_patches`: whitened 12 x 12 patches, H latents, minibatches of 500,
SVI with Adam at lr 0.01 on a cosine schedule, EntropyELBO), only the encoder differs. Reported
per configuration:

- ELBO/N: the exact training objective per patch at the end (L_H);
- held out: the ELBO per patch of ``--held-out`` other patches (another seed, whitened with the
  training patches' whitening) at the trained lambda, sigma^2 (:func:`pyro_esc.held_out_elbo`);
- the gap to per-point posteriors: the held-out patches' per-point optimum at the same dictionary
  (:func:`pyro_esc.encode` with a per-point diagonal guide, ``AutoNormal``; L-BFGS, float64) minus
  the encoder's ELBO there, and the same with full covariances (``LocalMultivariateNormal``) when
  ``--full-optimum`` is given;
- code sparseness (kurtosis of the posterior means), mean field spread, training time.

``--size full`` is reproduce's full setting (20,000 patches, H = 144, 100 epochs), ``--size quick``
its ``--quick`` one (5000 patches, H = 100). Results are appended to a JSON-lines file (``--out``);
runs already there are skipped; ``--table`` prints the table::

    python benchmarks/patch_encoders.py --size quick --configs h100-diag h100-lowrank h2x200-diag
    python benchmarks/patch_encoders.py --table

One torch thread. The measured table and what it decided: BENCHMARKS.md ("The paper's experiments").
"""

import argparse
import json
import os
import time
import warnings

import torch

import pyro

from records import read_records

#: name -> (guide name of pyro_esc.experiments.make_guide, hidden layers, description).
CONFIGS = {
    "h100-diag": ("amortized-diag", (100,), "1 x 100, diag (reproduce's until now)"),
    "h100-lowrank": ("amortized-lowrank", (100,), "1 x 100, low-rank 5"),
    "h2x200-diag": ("amortized-diag", (200, 200), "2 x 200, diag"),
    "h2x200-lowrank": ("amortized-lowrank", (200, 200), "2 x 200, low-rank 5"),
    "h200-diag": ("amortized-diag", (200,), "1 x 200, diag"),
    "h300-diag": ("amortized-diag", (300,), "1 x 300, diag"),
    "h500-diag": ("amortized-diag", (500,), "1 x 500, diag"),
    "h1000-diag": ("amortized-diag", (1000,), "1 x 1000, diag"),
    "h2x300-diag": ("amortized-diag", (300, 300), "2 x 300, diag"),
    "h300-lowrank": ("amortized-lowrank", (300,), "1 x 300, low-rank 5"),
    "h100-full": ("amortized-full", (100,), "1 x 100, full"),
}
SIZES = {"full": dict(n=20000, latents=144), "quick": dict(n=5000, latents=100), "tiny": dict(n=300, latents=12)}


def run_one(config, size, epochs, seed, held_out, full_optimum):
    from pyro.infer.autoguide import AutoNormal

    from pyro_esc import LocalMultivariateNormal, encode, held_out_elbo
    from pyro_esc.data import image_patches
    from pyro_esc.experiments import patch_data, run_patches

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    pyro.clear_param_store()
    setting = SIZES[size]
    side = 6 if size == "tiny" else 12
    x, whitening = patch_data(setting["n"], side, seed)
    x_test = whitening.transform(image_patches(held_out, size=side, seed=seed + 1)).float()
    guide, hidden, _ = CONFIGS[config]
    result = run_patches(x, whitening, side, guide=guide, hidden=hidden, n_latents=setting["latents"],
                         epochs=epochs, batch_size=min(500, setting["n"]), lr=0.01, seed=seed, progress=False)
    model, encoder = result.model, result.guide_object
    record = dict(config=config, size=size, epochs=epochs, seed=seed, elbo=result.elbo,
                  train_time_s=result.wall_time_s, kurtosis=result.sparseness["kurtosis"],
                  spread_px=result.mean_field_spread_px, held_out=held_out_elbo(model, encoder, x_test))
    diagonal = held_out_elbo(model, encode(model, AutoNormal(model, create_plates=model.create_plates), x_test), x_test)
    record["gap_diag_optimum"] = diagonal - record["held_out"]
    if full_optimum:
        full = held_out_elbo(model, encode(model, LocalMultivariateNormal(model), x_test), x_test)
        record["gap_full_optimum"] = full - record["held_out"]
    return record



def table(records):
    lines = ["| size | encoder | epochs | ELBO/N | held out | gap to per-point diag | gap to per-point full "
             "| kurtosis | spread px | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        full = f"{r['gap_full_optimum']:.3f}" if "gap_full_optimum" in r else "-"
        lines.append(f"| {r['size']} | {CONFIGS[r['config']][2]} | {r['epochs']} | {r['elbo']:.3f} | "
                     f"{r['held_out']:.3f} | {r['gap_diag_optimum']:.3f} | {full} | {r['kurtosis']:.1f} | "
                     f"{r['spread_px']:.2f} | {r['train_time_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["h100-diag", "h100-lowrank"])
    parser.add_argument("--size", choices=list(SIZES), default="quick")
    parser.add_argument("--epochs", type=int, default=100, help="passes over the patches (reproduce: 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=2000, help="held-out patches (default 2000)")
    parser.add_argument("--full-optimum", action="store_true",
                        help="also fit per-point full covariances to the held-out patches (slow at H = 144)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "patch_encoders.jsonl"))
    parser.add_argument("--table", action="store_true", help="only print the table of what has run")
    args = parser.parse_args(argv)
    if not args.table:
        done = {(r["config"], r["size"], r["epochs"], r["seed"]) for r in read_records(args.out)}
        for config in args.configs:
            if (config, args.size, args.epochs, args.seed) in done:
                continue
            started = time.perf_counter()
            record = run_one(config, args.size, args.epochs, args.seed, args.held_out, args.full_optimum)
            record["total_time_s"] = round(time.perf_counter() - started, 1)
            with open(args.out, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    text = table(read_records(args.out))
    print(text)
    return text


if __name__ == "__main__":
    main()
