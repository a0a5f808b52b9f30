"""Which minibatch route and settings: the exact ELBO reached per epoch budget, and the time it took.

Per-point diagonal posteriors (AutoNormal), EntropyELBO with running
statistics, cosine learning-rate decay to 0.1x, on

- whitened natural-image patches (16x16, H = 100, batch 512; N = 20,000 by default), and
- bars (5x5, sigma 0.3, H = 10, N = 2,000, batch 100).

Lines: the EM route (``optimizer="em"``, no learning rate: fit's default for these guides on
minibatches), the SVI route (Pyro's dense Adam, lr 0.05: the minibatch default before
the row-wise route), and the row-wise route (``optimizer="rowwise"``) over
learning rates and ``inner_steps``. The ELBO is the exact full-data value per
point after the last epoch (``History.final_elbo``); one core. Run:

    python benchmarks/minibatch_route.py [--patches 20000] [--epochs 10] [--bars-epochs 30]
"""

import argparse
import time

import torch

import pyro
from pyro.infer.autoguide import AutoNormal

from pyro_esc import SparseCoding, fit
from pyro_esc.data import bars
from pyro_esc.experiments import patch_data

#: (route, inner_steps, lr): the grid of the README's table.
SETTINGS = ([("em", 1, None), ("svi", 1, 0.05)] + [("rowwise", k, lr) for k in (1, 2, 4) for lr in (0.05, 0.1, 0.2)]
            + [("rowwise", 4, 0.4)] + [("rowwise", k, lr) for k in (8, 16) for lr in (0.2, 0.4)])


def parse_setting(text):
    """``"em"`` -> ("em", 1, None); ``"rowwise:8:0.2"`` -> ("rowwise", 8, 0.2)."""
    if text == "em":
        return "em", 1, None
    route, inner_steps, lr = text.split(":")
    return route, int(inner_steps), float(lr)


def run(x, n_latents, batch, epochs, route, inner_steps, lr):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = SparseCoding(x.size(1), n_latents)
    guide = AutoNormal(model, create_plates=model.create_plates)
    options = {"inner_steps": inner_steps} if route == "rowwise" else {}
    if route != "em":
        options.update(lr=lr, lr_schedule="cosine")
    start = time.perf_counter()
    history = fit(model, guide, x, batch_size=batch, epochs=epochs, optimizer=route, progress=False, **options)
    return history.final_elbo, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=20000, help="patches N (default 20000)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs on patches (default 10)")
    parser.add_argument("--bars-epochs", type=int, default=30, help="epochs on bars (default 30)")
    parser.add_argument("--only", nargs="+", default=None, metavar="ROUTE:K:LR",
                        help="run only these settings (e.g. em rowwise:8:0.2 svi:1:0.05)")
    parser.add_argument("--budget", type=int, default=None, metavar="EPOCHS",
                        help="equal work instead of equal epochs: each row-wise setting runs EPOCHS / inner_steps "
                             "epochs on patches (the same number of gradient evaluations)")
    parser.add_argument("--problems", nargs="+", default=["patches", "bars"], choices=["patches", "bars"])
    args = parser.parse_args(argv)
    settings = SETTINGS if args.only is None else [parse_setting(item) for item in args.only]
    torch.set_num_threads(1)
    problems = {"patches": lambda: (patch_data(args.patches, 16, 0)[0], 100, 512, args.epochs),
                "bars": lambda: (bars(2000, side=5, noise=0.3, seed=0)[0], 10, 100, args.bars_epochs)}
    for name in args.problems:
        x, n_latents, batch, epochs = problems[name]()
        print(f"\n{name}: N = {x.size(0)}, D = {x.size(1)}, H = {n_latents}, batch {batch}")
        print("| route | inner_steps | lr | epochs | ELBO per point | time (s) |")
        print("|---|---|---|---|---|---|")
        for route, inner_steps, lr in settings:
            run_epochs = epochs
            if args.budget is not None and name == "patches":
                run_epochs = max(1, args.budget // (inner_steps if route == "rowwise" else 1))
            elbo, seconds = run(x, n_latents, batch, run_epochs, route, inner_steps, lr)
            print(f"| {route} | {inner_steps if route == 'rowwise' else '-'} | {lr or '-'} | {run_epochs} | {elbo:.4f} | "
                  f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
