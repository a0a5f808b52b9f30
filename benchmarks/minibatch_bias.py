"""How biased is EntropyELBO's ``minibatch_statistics="batch"``? A measurement at fixed parameters.

With batch statistics, lambda* and sigma^2* are estimated from the batch alone, and L_H takes their
logarithm: the mean over batches of log(batch mean) is below log(full mean) (Jensen), so the
batch estimate of the ELBO is too high, the more so the smaller the batch. Running statistics
(the default) use the whole data set's per-point table instead.

At parameters trained for a while (bars, sigma 0.3, LocalMultivariateNormal), this script draws
many random batches of each size and reports, per data point, the mean batch estimate minus the
exact full-data L_H, with its standard error and the bias in standard errors::

    python benchmarks/minibatch_bias.py                 # N = 200, B = 10, 20, 50
"""

import argparse
import math
import sys

import torch

import pyro

from pyro_esc import EntropyELBO, LocalMultivariateNormal, SparseCoding, fit
from pyro_esc.data import bars


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[10, 20, 50])
    parser.add_argument("--batches", type=int, default=2000, help="random batches per size")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.clear_param_store()
    x, _ = bars(args.n, seed=args.seed, dtype=torch.float64)
    model = SparseCoding(x.size(1), 10)
    guide = LocalMultivariateNormal(model)
    fit(model, guide, x, steps=args.train_steps, tol=None, seed=args.seed, progress=False)
    exact = -EntropyELBO().loss(model, guide, x) / args.n
    batch_elbo = EntropyELBO(minibatch_statistics="batch")
    running_elbo = EntropyELBO()
    running_elbo.update(model, guide, x, subsample=torch.arange(1))  # builds the per-point table
    generator = torch.Generator().manual_seed(args.seed)
    rows = {}
    print(f"exact L_H per point: {exact:.4f} (N = {args.n})")
    print("| B | batch estimate - exact (nats/point) | SE | bias / SE | running estimate - exact |")
    print("|---|---|---|---|---|")
    def batch(size):
        return torch.randperm(args.n, generator=generator)[:size]

    for size in args.batch_sizes:
        estimates = torch.tensor([-batch_elbo.loss(model, guide, x, subsample=batch(size)) / args.n
                                  for _ in range(args.batches)], dtype=torch.float64)
        running = -running_elbo.loss(model, guide, x, subsample=batch(size)) / args.n
        bias = float(estimates.mean()) - exact
        standard_error = float(estimates.std()) / math.sqrt(args.batches)
        rows[size] = {"bias": bias, "standard_error": standard_error, "running_minus_exact": running - exact}
        print(f"| {size} | {bias:+.4f} | {standard_error:.4f} | {bias / standard_error:.1f} | {running - exact:+.1e} |")
    return {"exact": exact, "rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
