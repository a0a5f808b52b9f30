"""Per-point posteriors at a fixed model: solve_posteriors against the joint L-BFGS fit and scikit-learn.

Two problems, each with a trained model and held-out points:

- patches: 10,000 whitened 16x16 patches, H = 100, diagonal posteriors; the model learned by
  ``fit``'s EM route on 20,000 other patches of the same whitening (3 epochs);
- bars: 1,000 points of 5x5 bars (noise 0.3), H = 10, full covariances; the model learned by
  ``fit`` (L-BFGS) on 1,000 other points.

Lines, timed in one run with 1 and with 2 torch threads:

- ``solve_posteriors`` (float64, tol 1e-9 nats per point): what encode, denoise, the estimator's
  transform and the EM route's E-step use;
- ``joint L-BFGS``: what encode did before: one L-BFGS run over all points' posteriors together,
  float64, fit's convergence test at tol 1e-9, the model fixed;
- ``scikit-learn SparseCoder (lasso_lars)`` on the same dictionary (patches only; MAP codes with
  alpha = sigma^2 / (D mean lambda), so a time reference, not the same estimate).

The ELBO columns compare the two posterior routes per point (the solver's minus L-BFGS's):
the solver must never be worse. Run::

    python benchmarks/solver_speed.py [--patches 10000] [--bars 1000] | tee benchmarks/results/solver_speed.txt
"""

import argparse
import time

import torch


def trained_patch_model(x, seed=0):
    import pyro
    from pyro.infer.autoguide import AutoNormal

    from pyro_esc import SparseCoding, fit

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = SparseCoding(x.size(1), 100)
    fit(model, AutoNormal(model, create_plates=model.create_plates), x, batch_size=512, epochs=3, progress=False)
    return model


def trained_bars_model(n=1000, seed=0):
    import pyro

    from pyro_esc import LocalMultivariateNormal, SparseCoding, fit
    from pyro_esc.data import bars

    x, _ = bars(n, noise=0.3, seed=seed)
    pyro.clear_param_store()
    model = SparseCoding(25, 10)
    fit(model, LocalMultivariateNormal(model), x, progress=False)
    return model


def joint_lbfgs(model, x, covariance):
    import pyro
    from pyro.infer.autoguide import AutoNormal

    from pyro_esc import AnalyticELBO, LocalMultivariateNormal, fit
    from pyro_esc.encoding import fixed_copy
    from pyro_esc.posterior import gaussian_posterior

    with pyro.get_param_store().scope():
        fixed = fixed_copy(model, torch.float64, x.device)
        guide = (LocalMultivariateNormal(fixed) if covariance == "full"
                 else AutoNormal(fixed, create_plates=fixed.create_plates))
        fit(fixed, guide, x.double(), loss=AnalyticELBO(), optimizer="lbfgs", train_model=False, tol=1e-9,
            progress=False)
        with torch.no_grad():
            return gaussian_posterior(guide, x.double()).detach()


def point_elbos_of(model, posterior, x):
    from pyro_esc.refinement import point_elbos

    with torch.no_grad():
        return point_elbos(posterior.to(torch.float64), x.double(), model.dictionary.detach().double(),
                           model.prior_scale.detach().double(), model.noise_var.detach().double())


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def sparse_coder_time(model, x):
    from sklearn.decomposition import SparseCoder

    dictionary = model.dictionary.detach().double().T.numpy()
    alpha = float(model.noise_var.detach()) / (dictionary.shape[1] * float(model.prior_scale.detach().mean()))
    coder = SparseCoder(dictionary, transform_algorithm="lasso_lars", transform_alpha=alpha)
    _, seconds = timed(lambda: coder.transform(x.double().numpy()))
    return seconds


def measure(name, model, x, covariance, sklearn):
    from pyro_esc import solve_posteriors

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        solved, solver_s = timed(lambda: solve_posteriors(model, x, covariance))
        joint, joint_s = timed(lambda: joint_lbfgs(model, x, covariance))
        difference = point_elbos_of(model, solved.posterior, x) - point_elbos_of(model, joint, x)
        coder_s = sparse_coder_time(model, x) if sklearn else None
        rows.append((threads, solver_s, joint_s, coder_s, float(difference.min()), float(difference.mean()),
                     bool(solved.converged.all())))
    print(f"\n{name}: {x.size(0):,} points, D = {x.size(1)}, H = {model.n_latents}, {covariance} covariances")
    print("| threads | solve_posteriors (s) | joint L-BFGS (s) | L-BFGS / solver | SparseCoder (s) | "
          "SparseCoder / solver | ELBO solver - L-BFGS, min | mean | all converged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads, solver_s, joint_s, coder_s, low, mean, converged in rows:
        coder = "-" if coder_s is None else f"{coder_s:.2f} | {coder_s / solver_s:.0f}"
        print(f"| {threads} | {solver_s:.3f} | {joint_s:.2f} | {joint_s / solver_s:.0f} | "
              f"{coder if coder_s is not None else '- | -'} | {low:+.1e} | {mean:+.1e} | {converged} |", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=10000)
    parser.add_argument("--bars", type=int, default=1000)
    parser.add_argument("--train", type=int, default=20000, help="patches the patch model is learned from")
    args = parser.parse_args(argv)
    from pyro_esc.data import bars
    from pyro_esc.experiments import patch_data

    torch.set_num_threads(1)
    results = {}
    if args.patches:
        x, _ = patch_data(args.train + args.patches, 16, seed=0)
        model = trained_patch_model(x[:args.train])
        x = x[args.train:]
        results["patches"] = measure("patches", model, x, "diag", sklearn=True)
    if args.bars:
        model = trained_bars_model()
        x, _ = bars(args.bars, noise=0.3, seed=1)
        results["bars"] = measure("bars", model, x, "full", sklearn=False)
    return results


if __name__ == "__main__":
    main()
