"""The same bars in other units: fit's routes on data times c.

5x5 bars (N = 1000, noise 0.1, data seeds 0-2, H = 10), multiplied by c in 1e-3, 1, 16, 255, 1000. The model
is scale-equivariant, so a unit-free route gives ELBO + D log c (the ELBO of the data in their own
units, shifted back) and the bars found the same for every c. Routes:

- ``lbfgs-full``: fit's full-data default with per-point full covariances (L-BFGS, on the data
  brought by a power of two near the scale its defaults were measured at, pyro_esc.standard_units;
  before, c = 100 converged to the all-zero code, 255 stalled at step 7 and 0.001 turned NaN);
- ``lbfgs-diag``: the same with AutoNormal;
- ``em-minibatch``: fit's minibatch default (EM, batches of 100, 10 epochs);
- the gradient routes, ``--gradient-steps`` steps each (default 5000), which train in standard units
  too since issue 27 (before, bars times 100 explained none of the data on SVI and the row-wise route):
  ``svi-diag`` (SVI on the full data, AutoNormal), ``rowwise-full`` (the row-wise route, batches of 100,
  LocalMultivariateNormal) and ``svi-encoder`` (SVI on the full data, an AmortizedNormal with one hidden
  layer of 100, full covariances).

Scales 1 + 1e-7 and 1.001 (``--scales``) tell units from rounding: a route whose result moves there
as much as between units is sensitive to rounding, not to units.

Run (one thread, about 10 minutes for the first three routes)::

    python benchmarks/units.py | tee benchmarks/results/units.txt
"""

import argparse
import math
import time
import warnings

import torch

SCALES = (1e-3, 1.0, 16.0, 255.0, 1e3)


ROUTES = ("lbfgs-full", "lbfgs-diag", "em-minibatch", "svi-diag", "rowwise-full", "svi-encoder")


def run(route, x, true, seed=0, steps=None, gradient_steps=5000):
    import pyro
    from pyro.infer.autoguide import AutoNormal

    from pyro_esc import AmortizedNormal, LocalMultivariateNormal, SparseCoding, fit
    from pyro_esc.metrics import bars_recovery

    with pyro.get_param_store().scope(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyro.set_rng_seed(seed)  # the model's and an encoder's initial draws: the same for every c
        model = SparseCoding(x.size(1), 10)
        if route == "svi-diag":
            guide = AutoNormal(model, create_plates=model.create_plates)
            options = {"optimizer": "svi", "steps": gradient_steps}
        elif route == "rowwise-full":
            guide = LocalMultivariateNormal(model)
            options = {"optimizer": "rowwise", "batch_size": 100, "steps": gradient_steps}
        elif route == "svi-encoder":
            guide = AmortizedNormal(x.size(1), 10, hidden=(100,), covariance="full")
            options = {"optimizer": "svi", "steps": gradient_steps}
        elif route == "lbfgs-full":
            guide, options = LocalMultivariateNormal(model), {"steps": steps}
        elif route == "lbfgs-diag":
            guide, options = AutoNormal(model, create_plates=model.create_plates), {"steps": steps}
        else:
            guide = AutoNormal(model, create_plates=model.create_plates)
            options = {"batch_size": 100, "epochs": 10}
        start = time.perf_counter()
        try:
            history = fit(model, guide, x, seed=seed, progress=False, **options)
        except Exception as error:  # noqa: BLE001 - a failure is a result here
            return {"error": f"{type(error).__name__}: {str(error)[:60]}"}
        seconds = time.perf_counter() - start
        found = bars_recovery(model.dictionary.detach(), true).num_found
    words = [str(warning.message).split(":")[1].strip()[:28] for warning in caught
             if "fit:" in str(warning.message)]
    return {"elbo": history.final_elbo, "found": found, "steps": history.step[-1], "seconds": seconds,
            "stop": history.stop_reason.split(":")[0], "warnings": "; ".join(words)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", nargs="+", default=list(ROUTES[:3]), choices=ROUTES)
    parser.add_argument("--gradient-steps", type=int, default=5000,
                        help="steps of the SVI and row-wise routes (default 5000)")
    parser.add_argument("--scales", nargs="+", type=float, default=list(SCALES))
    parser.add_argument("--n", type=int, default=1000, help="data points (default 1000)")
    parser.add_argument("--steps", type=int, default=None, help="L-BFGS step limit (default: fit's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data seeds (default 0 1 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from pyro_esc.data import bars

    print("| route | seed | c | ELBO + D log c | bars found | steps | stop | s | warnings |")
    print("|---|---|---|---|---|---|---|---|---|")
    for route in args.routes:
        for seed in args.seeds:
            x, true = bars(args.n, noise=0.1, seed=seed)
            for scale in args.scales:
                result = run(route, x * scale, true, steps=args.steps, gradient_steps=args.gradient_steps)
                if "error" in result:
                    print(f"| {route} | {seed} | {scale:g} | {result['error']} | | | | | |", flush=True)
                    continue
                shifted = result["elbo"] + x.size(1) * math.log(scale)
                print(f"| {route} | {seed} | {scale:g} | {shifted:.5f} | {result['found']}/10 | {result['steps']} | "
                      f"{result['stop']} | {result['seconds']:.1f} | {result['warnings']} |", flush=True)


if __name__ == "__main__":
    main()
