"""Bars recovery over seeds: which guides and objectives find every bar (docs/theory.md, Gaussian posteriors).

The standard bars test (5x5 pixels, H = 10 bars, N = 1000, noise sigma = 0.3, Laplace
amplitudes with scale 1; ``pyro_esc.data.bars(1000, seed=s)``). For every configuration and
seed s, the model and guide are trained from scratch with ``pyro.set_rng_seed(s)``, then it
reports whether all 10 bars were found (|cosine| > 0.95 after optimal matching,
``pyro_esc.metrics.bars_recovery``), the final ELBO per data point and the wall time of the
training.

The final ELBO is the closed-form ELBO of the final guide and dictionary at Theorem 2's
lambda*, sigma^2* (``-EntropyELBO().loss / N``), for every objective alike, so the columns
compare the points that training reached, not the estimators' noise.

Two training recipes, one for all configurations. ``--recipe defaults`` (the default) is
``fit(model, guide, x, loss=..., seed=s)`` and nothing else: L-BFGS to convergence for the closed-form
objective, Adam for Trace_ELBO; a run that stops on a non-finite objective is counted as diverged.
``--recipe adam`` is the recipe ``run_bars`` keeps for diagonal guides (tuned on seeds 0-9 for
LocalMultivariateNormal + EntropyELBO, confirmed on seeds 10-19; not tuned per seed): full-batch SVI,
Pyro's ClippedAdam (clip_norm 10), betas (0.9, 0.99), learning rate 0.2 decayed geometrically to
0.2 x 0.2 over the run (``lrd``), 2000 steps; the encoder of AmortizedNormal takes a smaller rate
(see ``AMORTIZED_LR``): an MLP's output moves by about lr x its fan-in per Adam step. Run:

    python benchmarks/bars_recovery.py                        # every configuration, 10 seeds
    python benchmarks/bars_recovery.py --configs local autonormal --seeds 3 --recipe adam

What it was written to check: which families find all bars on 9 or more seeds in 10. At
``--recipe defaults`` the amortised configurations take minutes per run (L-BFGS from scratch, up to
its 20,000-step limit) and AutoMultivariateNormal 90-180 s per run even on N = 100.

The results, and the commands and commit that made them: BENCHMARKS.md, "Bars recovery by posterior
family".
"""

import argparse
import math
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch

import pyro
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_esc import AmortizedNormal, EntropyELBO, LocalMultivariateNormal, NonFiniteObjectiveError, SparseCoding, fit
from pyro_esc.data import bars
from pyro_esc.metrics import bars_recovery
from pyro_esc.training import decaying_adam

STEPS = 2000
LR = 0.2
DECAY_TO = 0.2  # the learning rate ends at LR * DECAY_TO
BETAS = (0.9, 0.99)
AMORTIZED_LR = 0.003
HIDDEN = 10


class Config(NamedTuple):
    description: str
    guide: Callable  # model -> guide
    loss: Callable  # () -> ELBO
    num_data: int = 1000
    guide_lr: Optional[float] = None  # learning rate of the guide's parameters, if not LR


def amortized(covariance):
    return lambda model: AmortizedNormal(25, HIDDEN, hidden=(100,), covariance=covariance)


CONFIGS = {
    "local": Config("LocalMultivariateNormal + EntropyELBO", LocalMultivariateNormal, EntropyELBO),
    "amortized-full": Config("AmortizedNormal(full) + EntropyELBO", amortized("full"), EntropyELBO,
                             guide_lr=AMORTIZED_LR),
    "amortized-diag": Config("AmortizedNormal(diag) + EntropyELBO", amortized("diag"), EntropyELBO,
                             guide_lr=AMORTIZED_LR),
    "autonormal": Config("AutoNormal + EntropyELBO", AutoNormal, EntropyELBO),
    "automvn-100": Config("AutoMultivariateNormal, N=100 + EntropyELBO", AutoMultivariateNormal, EntropyELBO,
                          num_data=100),
    "local-100": Config("LocalMultivariateNormal, N=100 + EntropyELBO", LocalMultivariateNormal, EntropyELBO,
                        num_data=100),
    "local-trace": Config("LocalMultivariateNormal + Trace_ELBO", LocalMultivariateNormal, Trace_ELBO),
    "amortized-full-trace": Config("AmortizedNormal(full) + Trace_ELBO", amortized("full"), Trace_ELBO,
                                   guide_lr=AMORTIZED_LR),
    "amortized-diag-trace": Config("AmortizedNormal(diag) + Trace_ELBO", amortized("diag"), Trace_ELBO,
                                   guide_lr=AMORTIZED_LR),
    "autonormal-trace": Config("AutoNormal + Trace_ELBO", AutoNormal, Trace_ELBO),
}


def train(model, guide, x, loss, seed, steps=STEPS, lr=LR, guide_lr=None, decay_to=DECAY_TO):
    """Full-batch training with the benchmark's recipe (``pyro_esc.training.decaying_adam``)."""
    prefix = guide._pyro_name + "."
    optim = decaying_adam(lr, steps, decay_to=decay_to, betas=BETAS,
                          lr_for=lambda name: guide_lr if guide_lr is not None and name.startswith(prefix) else None)
    fit(model, guide, x, loss=loss, steps=steps, optim=optim, seed=seed, progress=False)


def run(config, seed, steps=STEPS, lr=LR, recipe="defaults"):
    """Train one configuration on one seed; returns (bars found, all found, ELBO per point, seconds).

    ``recipe="defaults"`` is ``fit(model, guide, x, loss=..., seed=seed)`` and nothing else (L-BFGS to
    convergence for a closed-form objective, Adam for Trace_ELBO); ``"adam"`` is the recipe above.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x, true_dictionary = bars(config.num_data, seed=seed)
    model = SparseCoding(x.size(1), HIDDEN)
    start = time.perf_counter()
    guide = config.guide(model)
    try:
        if recipe == "defaults":
            fit(model, guide, x, loss=config.loss(), seed=seed, progress=False)
        else:
            train(model, guide, x, config.loss(), seed, steps=steps, lr=lr, guide_lr=config.guide_lr)
    except NonFiniteObjectiveError:  # fit stopped on a non-finite objective: a diverged run, counted as such
        return 0, False, math.nan, time.perf_counter() - start
    seconds = time.perf_counter() - start
    elbo = -EntropyELBO().loss(model, guide, x) / x.size(0)
    recovery = bars_recovery(model.dictionary, true_dictionary)
    return recovery.num_found, recovery.all_found, elbo, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 .. seeds-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--recipe", choices=("defaults", "adam"), default="defaults",
                        help="fit's defaults (default), or the Adam recipe above (--steps, --lr)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LR, help="initial learning rate (the encoder's stays AMORTIZED_LR)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: timings comparable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = range(args.first_seed, args.first_seed + args.seeds)

    recipe = ("fit's defaults" if args.recipe == "defaults" else
              f"{args.steps} full-batch steps, ClippedAdam lr {args.lr} -> {args.lr * DECAY_TO:g}, "
              f"betas {BETAS}, amortised encoder lr {AMORTIZED_LR}")
    print(f"bars 5x5, H={HIDDEN}, sigma=0.3; {recipe}; seeds {seeds.start}-{seeds.stop - 1}; "
          f"torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} thread(s)", flush=True)
    results = {}
    for name in args.configs:
        config = CONFIGS[name]
        results[name] = []
        for seed in seeds:
            found, all_found, elbo, seconds = run(config, seed, args.steps, args.lr, args.recipe)
            results[name].append((found, all_found, elbo, seconds))
            outcome = f"ELBO/N {elbo:9.4f}" if math.isfinite(elbo) else "diverged (non-finite objective)"
            print(f"  {name:22s} seed {seed:2d}: {found:2d}/10 bars, {outcome}, {seconds:6.1f} s", flush=True)

    print()
    print(f"| {'configuration':46s} | all found | mean bars | ELBO/N mean (min, max)       | time/run mean (max) |")
    print(f"|{'-' * 48}|-----------|-----------|------------------------------|---------------------|")
    for name, rows in results.items():
        found, all_found, elbo, seconds = zip(*rows)
        finite = [value for value in elbo if math.isfinite(value)]
        diverged = f"; {len(elbo) - len(finite)} diverged" if len(finite) < len(elbo) else ""
        elbos = (f"{statistics.mean(finite):9.4f} ({min(finite):8.4f}, {max(finite):8.4f})" if finite
                 else f"{'-':29s}")
        print(f"| {CONFIGS[name].description:46s} | {sum(all_found):4d}/{len(rows):<4d} | "
              f"{statistics.mean(found):9.1f} | {elbos}{diverged} | "
              f"{statistics.mean(seconds):7.1f} s ({max(seconds):5.1f} s) |")
    return results


if __name__ == "__main__":
    main()
