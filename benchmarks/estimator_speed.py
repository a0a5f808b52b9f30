"""SparseCodingEstimator on scikit-learn's digits: fit_transform time by guide and solver.

300 digits (64 features, scaled to [0, 1]), n_components left at its default (32), random_state 0,
every other option at its default. For each guide and solver: fit_transform's wall time, the
training steps, whether the fit converged, the final training ELBO per sample and ``score`` (the
held-out-style ELBO of the same data). ``solver="auto"`` takes, for each guide, the faster line of
this table (:data:`pyro_esc.sklearn.AUTO_SOLVERS`). Run::

    python benchmarks/estimator_speed.py [--configs local-diag:em local-full:lbfgs ...] [--threads 1]
"""

import argparse
import time
import warnings

import torch

CONFIGS = ("local-diag:em", "local-diag:lbfgs", "local-full:em", "local-full:lbfgs")


def measure(guide, solver, n, max_iter=None):
    from sklearn.datasets import load_digits

    from pyro_esc.sklearn import SparseCodingEstimator

    x = load_digits().data[:n] / 16.0
    estimator = SparseCodingEstimator(guide=guide, solver=solver, max_iter=max_iter, random_state=0)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimator.fit_transform(x)
    seconds = time.perf_counter() - started
    return {"guide": guide, "solver": solver, "seconds": seconds, "steps": estimator.n_iter_,
            "converged": estimator.converged_, "elbo": estimator.elbo_, "score": estimator.score(x)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="guide:solver pairs")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--max-iter", type=int, default=None, help=argparse.SUPPRESS)  # the smoke test's
    args = parser.parse_args(argv)
    rows = []
    print("| guide | solver | threads | fit_transform (s) | steps | converged | training ELBO | score |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for config in args.configs:
            guide, solver = config.split(":")
            row = dict(measure(guide, solver, args.n, args.max_iter), threads=threads)
            rows.append(row)
            print(f"| {guide} | {solver} | {threads} | {row['seconds']:.1f} | {row['steps']} | {row['converged']} | "
                  f"{row['elbo']:.3f} | {row['score']:.3f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
