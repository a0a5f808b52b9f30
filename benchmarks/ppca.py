"""Probabilistic PCA, exact end to end: fit with ``prior="gaussian"`` against the closed form.

Data drawn from PPCA models of three sizes (D, H) = (8, 3), (25, 5), (64, 16), N = 2000, seeds 0-2
(scales s_h spaced from 3 down to 1, sigma^2 = 0.25, a random dictionary). For each, the
maximum-likelihood solution in closed form (Tipping & Bishop 1999, :mod:`pyro_esc.evaluate.ppca`) and
three of fit's routes with per-point Gaussian guides:

- ``lbfgs-full``: the full-data default, one full-covariance Gaussian per point (LocalMultivariateNormal):
  the posteriors can be exact, so the ELBO must reach the maximum log-likelihood;
- ``em-full``: the minibatch default with the same guide (batches of 500, 100 epochs);
- ``lbfgs-diag``: AutoNormal, diagonal posteriors. These can be exact too: among the optima (any rotation R
  of the latents) is one with orthogonal columns of W (R = I), whose posteriors are uncorrelated, so the
  diagonal guide must reach the same maximum; whether L-BFGS finds that rotation is what it measures.

Columns: the learned ELBO per point minus the closed-form maximum log-likelihood, sigma^2's relative
error against the mean of the discarded eigenvalues, steps and seconds. Run (one thread, a few minutes)::

    python benchmarks/ppca.py | tee benchmarks/results/ppca.txt
"""

import argparse
import time
import warnings

import torch

SIZES = ((8, 3), (25, 5), (64, 16))
SEEDS = (0, 1, 2)
ROUTES = ("lbfgs-full", "em-full", "lbfgs-diag")


def ppca_data(dim, latents, seed, n):
    import pyro

    from pyro_esc import SparseCoding

    torch.manual_seed(seed)
    with pyro.get_param_store().scope():
        truth = SparseCoding(dim, latents, prior="gaussian").double()
        truth.set_dictionary(torch.randn(dim, latents, dtype=torch.float64))
        truth.set_scales(torch.linspace(3.0, 1.0, latents, dtype=torch.float64),
                         torch.tensor(0.25, dtype=torch.float64))
        return truth.sample(n)[1]


def run(route, x, latents):
    import pyro
    from pyro.infer.autoguide import AutoNormal

    from pyro_esc import LocalMultivariateNormal, SparseCoding, fit

    with pyro.get_param_store().scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SparseCoding(x.size(1), latents, prior="gaussian")
        if route == "lbfgs-diag":
            guide, options = AutoNormal(model, create_plates=model.create_plates), {}
        elif route == "em-full":
            guide, options = LocalMultivariateNormal(model), {"optimizer": "em", "batch_size": 500, "epochs": 100}
        else:
            guide, options = LocalMultivariateNormal(model), {}
        start = time.perf_counter()
        history = fit(model, guide, x, progress=False, seed=0, **options)
        return history.final_elbo, float(model.noise_var.detach()), history.step[-1], time.perf_counter() - start


def main(argv=None):
    from pyro_esc.evaluate.ppca import ppca_maximum_likelihood

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[d for size in SIZES for d in size],
                        help="pairs D H (default 8 3 25 5 64 16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    args = parser.parse_args(argv)
    sizes = list(zip(args.sizes[::2], args.sizes[1::2]))
    torch.set_num_threads(1)
    print(f"{'D':>3s} {'H':>3s} {'seed':>4s} {'route':>11s} {'ELBO - max log p':>17s} {'sigma2 rel. err':>16s} "
          f"{'steps':>6s} {'s':>6s}")
    for dim, latents in sizes:
        for seed in args.seeds:
            x = ppca_data(dim, latents, seed, args.n)
            solution = ppca_maximum_likelihood(x, latents)
            for route in args.routes:
                elbo, noise_var, steps, seconds = run(route, x, latents)
                gap = elbo - float(solution.log_likelihood)
                error = abs(noise_var - float(solution.noise_var)) / float(solution.noise_var)
                print(f"{dim:3d} {latents:3d} {seed:4d} {route:>11s} {gap:17.2e} {error:16.2e} {steps:6d} "
                      f"{seconds:6.1f}", flush=True)


if __name__ == "__main__":
    main()
