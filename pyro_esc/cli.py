"""The ``pyro-esc`` command line: learn bars, learn natural image patches, reproduce the figures.

::

    pyro-esc bars       [--guide local-full] [--noise 0.3] [--objective entropy] [--prior laplace] ...
    pyro-esc patches    [--size 12] [--latents 100] [--guide local-diag] [--batch-size B] ...
    pyro-esc denoise    IN OUT [--dictionary MODEL.pt] [--patch-size 7] [--latents H] ...
    pyro-esc reproduce  [--quick] [--out figures]

Every sub-command has ``--help`` (its options and their defaults). ``bars``, ``patches`` and
``reproduce`` write figures and a metrics JSON to ``--out``; ``denoise`` writes the images it is
given paths for.
"""

import argparse
import json
import os
import sys
import time

import torch

import pyro

from . import experiments
from ._checks import check_device
from .infer.annealing import Annealing
from .priors import registered_priors
from .train.em import DEFAULT_CHUNK, DEFAULT_MOMENTUM, EM, MIN_CHUNK


#: ``pyro-esc patches``' step limit when neither --steps nor --epochs is given.
PATCHES_STEPS = 1500


def _common(parser, steps, lr, out, lr_help, steps_help=None):
    parser.add_argument("--objective", choices=experiments.OBJECTIVES, default="entropy",
                        help="training objective (default: entropy, i.e. EntropyELBO)")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help or f"optimisation steps (default {steps})")
    parser.add_argument("--lr", type=float, default=lr,
                        help=lr_help if lr is None else f"{lr_help} (default {lr})")
    parser.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: full batch)")
    parser.add_argument("--anneal", type=int, default=None, metavar="STEPS",
                        help="anneal the entropy weights over the first STEPS steps with the default scheme "
                             "(beta_q linear 2 -> 1; default: no annealing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--out", default=out, help=f"output folder for figures and metrics (default {out})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _threads(parser)


def _threads(parser):
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these problems are small, and more threads mostly "
                             "add synchronisation overhead)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pyro-esc", description="Probabilistic sparse coding learned with the entropy-based ELBO.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bars,patches,denoise,reproduce}")

    bars = commands.add_parser("bars", help="learn the bars test and draw the learned fields",
                               description="Learn the bars test (side x side images, 2 side bars) and report "
                                           "how many bars were found (cosine > 0.95 after optimal matching).")
    bars.add_argument("--guide", choices=experiments.GUIDES, default="local-full",
                      help="posterior family (default local-full: a full-covariance Gaussian per data point)")
    bars.add_argument("--n", type=int, default=1000, help="data points (default 1000)")
    bars.add_argument("--side", type=int, default=5, help="image side (default 5: D = 25, H = 10)")
    bars.add_argument("--noise", type=float, default=0.3, help="noise standard deviation (default 0.3)")
    bars.add_argument("--optimizer", choices=("auto", "lbfgs", "svi"), default="auto",
                      help="auto (default): L-BFGS on the exact full-batch objective until convergence for "
                           "local-full with a closed-form objective, else SVI with the ClippedAdam recipe (the "
                           "better one for diagonal and amortised posteriors); lbfgs or svi to choose")
    bars.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                      help="amortised guides: learn the dictionary with per-point full covariances first, match the "
                           "encoder to the per-point posteriors solved at it, then train the encoder alone on points "
                           "drawn afresh from the model (pyro_esc.fit_amortized). Default: on for amortised guides "
                           "with the closed-form objectives on the full data and --optimizer auto or lbfgs; "
                           "--no-warm-start trains the encoder and dictionary together from the start")
    bars.add_argument("--hidden", type=int, nargs="+", default=None,
                      help=f"amortised guides: units of each hidden layer of the encoder (default "
                           f"{' '.join(map(str, experiments.BARS_WARM_START_HIDDEN))} with the warm start, 100 "
                           f"with --no-warm-start)")
    bars.add_argument("--n-init", type=int, default=None,
                      help=f"initialisations (restarts); the best final ELBO is kept (default "
                           f"{experiments.BARS_N_INIT})")
    bars.add_argument("--tol", type=float, default=None,
                      help="convergence: relative change of the ELBO over 20 steps (default: fit's, 1e-7)")
    bars.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                      help="dtype of the data, model and guide (default float32; an L-BFGS run that stalls on "
                           "float32's resolution goes on in float64 either way, and ends in this dtype)")
    bars.add_argument("--prior", choices=registered_priors(), default="laplace",
                      help="prior over the codes (default laplace: sparse coding; gaussian: probabilistic PCA, "
                           "which finds the bars' subspace but not the bars themselves)")
    bars.add_argument("--no-reference", action="store_true",
                      help="skip fitting the posteriors at the generating dictionary (the reference ELBO)")
    _common(bars, steps=None, lr=0.2, out="runs/bars",
            lr_help="SVI route: initial learning rate of ClippedAdam, decaying to 0.2x over the run",
            steps_help="step limit (default: 20000 for L-BFGS, which stops on convergence; 2000 for SVI)")
    bars.set_defaults(run=_bars)

    patches = commands.add_parser("patches", help="learn sparse codes of whitened natural image patches",
                                  description="Learn generative fields of whitened natural image patches cut "
                                              "from images bundled with scikit-image/scikit-learn.")
    patches.add_argument("--guide", choices=experiments.GUIDES, default="local-diag",
                         help="posterior family (default local-diag: a diagonal Gaussian per patch)")
    patches.add_argument("--n", type=int, default=10000, help="patches (default 10000)")
    patches.add_argument("--size", type=int, default=12, help="patch side in pixels (default 12)")
    patches.add_argument("--latents", type=int, default=100, help="number of latents H (default 100)")
    _common(patches, steps=None, lr=None, out="runs/patches",
            steps_help=f"optimisation steps (default {PATCHES_STEPS}; or --epochs)",
            lr_help="a gradient route's initial Adam learning rate, cosine-decayed to 0.1x (default: 0.05 on the "
                    "SVI route, 0.4 on the row-wise route); with a per-point guide on minibatches it selects the "
                    "row-wise route")
    patches.add_argument("--epochs", type=int, default=None,
                         help="passes over the data, instead of --steps (with --batch-size: N / batch steps each)")
    patches.add_argument("--annealing", choices=("none", "default", "authors"), nargs="+", default=None,
                         help="entropy annealing by name: none, default (beta_q 2 -> 1 over the first half), authors "
                              "(beta_p 10 -> 1 stepwise over the first five epochs; gradient routes only); several "
                              "names run one after the other and draw their fields and curves side by side; "
                              "--anneal STEPS is the default scheme over STEPS steps")
    patches.add_argument("--optimizer", choices=("auto", "em", "svi", "rowwise"), default="auto",
                         help="fit's route (default auto: EM for per-point guides on minibatches, the row-wise route "
                              "if --lr or --inner-steps is given)")
    patches.add_argument("--chunk", type=int, default=None,
                         help=f"EM route: patches solved between two dictionary updates (default: a tenth of "
                              f"--n, at least {MIN_CHUNK} and at most {DEFAULT_CHUNK})")
    patches.add_argument("--momentum", type=float, default=None,
                         help=f"EM route: heavy-ball weight of the dictionary's extrapolation (default: 0 on "
                              f"minibatches, {DEFAULT_MOMENTUM} on the full data)")
    patches.add_argument("--hidden", type=int, nargs="+", default=list(experiments.PATCH_ENCODER_HIDDEN),
                         help=f"amortised guides: units of each hidden layer of the encoder (default "
                              f"{' '.join(map(str, experiments.PATCH_ENCODER_HIDDEN))})")
    patches.add_argument("--inner-steps", type=int, default=None,
                         help="row-wise route: updates of each batch's posteriors per step (default 4)")
    patches.set_defaults(run=_patches)

    denoise = commands.add_parser("denoise", help="denoise a grey-scale image; the noise level is learned",
                                  description="Denoise an image with a learned sparse code: posterior means of "
                                              "its overlapping patches, averaged. The noise level is learned "
                                              "(sigma^2*), never given.")
    denoise.add_argument("input", help="the noisy image (any format Pillow reads; colour is converted to grey)")
    denoise.add_argument("output", help="where to write the denoised image (PNG, 8 bit)")
    denoise.add_argument("--noise-image", default=None, metavar="PATH",
                         help="also write the removed noise (input - output), scaled to [0, 1] around mid-grey")
    denoise.add_argument("--dictionary", default=None, metavar="MODEL.pt",
                         help="a saved model (pyro_esc.save) whose dictionary to use; default: learn one from "
                              "the noisy image itself")
    denoise.add_argument("--patch-size", type=int, default=7, help="patch side in pixels (default 7)")
    denoise.add_argument("--latents", type=int, default=None,
                         help="dictionary size when learning one (default: half the pixels of a patch, 24 for 7x7; "
                              "with as many latents as pixels the noise is explained by the codes)")
    denoise.add_argument("--steps", type=int, default=None,
                         help="EM step limit of each fit (default 30; each stops earlier on convergence)")
    denoise.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    denoise.add_argument("--quiet", action="store_true", help="no progress bars")
    _threads(denoise)
    denoise.set_defaults(run=_denoise)

    reproduce = commands.add_parser("reproduce", help="regenerate the paper's figures and metrics",
                                    description="Run the bars and natural-patch experiments and write every "
                                                "figure and metrics.json into --out.")
    reproduce.add_argument("--quick", action="store_true",
                           help="a reduced reproduction (a few minutes on a laptop CPU)")
    reproduce.add_argument("--out", default=None,
                           help="output folder (default figures/, or figures/quick/ with --quick)")
    reproduce.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    reproduce.add_argument("--device", default=None, help="torch device (default: cpu)")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    _threads(reproduce)
    reproduce.set_defaults(run=_reproduce)
    return parser


def _write_metrics(out, name, result):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as handle:
        json.dump(result.metrics(), handle, indent=2)
    return path


def _save_model(out, name, result, whitening):
    # The model (and an amortised guide's encoder, and the whitening) beside the metrics, for
    # pyro_esc.load; per-point posteriors describe only the training points and stay out.
    from .variational.guides import AmortizedNormal
    from .saving import save

    guide = result.guide_object if isinstance(result.guide_object, AmortizedNormal) else None
    save(os.path.join(out, name), result.model, guide, whitening=whitening, metrics=result.metrics())


def _bars(args):
    result = experiments.run_bars(args.guide, args.objective, n=args.n, side=args.side, noise=args.noise,
                                  steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                                  annealing=None if args.anneal is None else Annealing.default(args.anneal),
                                  device=args.device, out=args.out, progress=not args.quiet,
                                  optimizer=args.optimizer, n_init=args.n_init,
                                  tol="auto" if args.tol is None else args.tol, reference=not args.no_reference,
                                  dtype=getattr(torch, args.dtype),
                                  warm_start="auto" if args.warm_start is None else args.warm_start,
                                  hidden=None if args.hidden is None else tuple(args.hidden), prior=args.prior)
    path = _write_metrics(args.out, "bars_metrics.json", result)
    _save_model(args.out, "bars_model.pt", result, whitening=None)
    prior = "" if args.prior == "laplace" else f", {args.prior} prior"
    print(f"{experiments.GUIDE_LABELS[args.guide]}{prior}, {args.objective}, {result.optimizer}: ELBO per data point "
          f"{result.elbo:.4f}; {result.bars_found} of {2 * args.side} bars found (cosine > 0.95) in "
          f"{result.wall_time_s:.1f} s")
    if result.reference_elbo is not None:
        print(f"reference (generating dictionary, posteriors fitted): {result.reference_elbo:.4f}; learned - "
              f"reference = {result.elbo_minus_reference:+.4f} per data point")
    if result.n_init > 1:
        print("restarts: final ELBO " + ", ".join(f"{value:.4f}" for value in result.restart_elbos))
    stage = (" in the per-point dictionary stage, before the encoder was matched to it and trained on model samples"
             if result.warm_start else "")
    print(f"{result.steps} steps{stage}; {result.stop_reason}")
    print(f"figures and metrics in {args.out}/ ({os.path.basename(path)}); the model in bars_model.pt "
          f"(pyro_esc.load)")


def _patches(args):
    if args.anneal is not None and args.annealing is not None:
        raise ValueError("pass --anneal STEPS or --annealing NAME, not both")
    if args.steps is not None and args.epochs is not None:
        raise ValueError("pass --steps or --epochs, not both (--epochs sets the number of steps)")
    if args.steps is None and args.epochs is None:
        args.steps = PATCHES_STEPS
    if args.anneal is not None:
        settings = {"default": Annealing.default(args.anneal)}
    else:
        names = args.annealing or ["none"]
        if len(set(names)) != len(names):
            raise ValueError(f"--annealing: each name once, got {' '.join(names)}")
        settings = {name: None if name == "none" else name for name in names}
    optimizer = args.optimizer
    if args.chunk is not None or args.momentum is not None:
        if optimizer not in ("auto", "em"):
            raise ValueError("--chunk and --momentum set the EM route; leave them out with --optimizer "
                             f"{optimizer}")
        optimizer = EM(chunk=args.chunk, momentum=args.momentum)
    x, whitening = experiments.patch_data(args.n, args.size, args.seed)
    snapshots = experiments.epoch_snapshots(args.epochs, args.n, args.batch_size)
    results = {}
    for name, annealing in settings.items():
        results[name] = experiments.run_patches(
            x, whitening, args.size, guide=args.guide, objective=args.objective, n_latents=args.latents,
            steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, annealing=annealing,
            seed=args.seed, device=args.device, progress=not args.quiet, optimizer=optimizer,
            inner_steps=args.inner_steps, hidden=tuple(args.hidden), snapshots=snapshots)
    experiments.patches_run_figures(args.out, results, whitening, args.size, x.size(0), args.batch_size)
    single = len(results) == 1
    for name, result in results.items():
        suffix = "" if single else f"_{name}"
        _write_metrics(args.out, f"patches_metrics{suffix}.json", result)
        _save_model(args.out, f"patches_model{suffix}.pt", result, whitening=whitening)
        print(f"{'' if single else f'annealing {name}: '}ELBO per data point {result.elbo:.4f}; code kurtosis "
              f"{result.sparseness['kurtosis']:.2f}; median field spread {result.median_field_spread_px:.2f} px; "
              f"{result.steps} steps ({result.route}, {result.optimizer}) in {result.wall_time_s:.1f} s")
    print(f"figures and metrics in {args.out}/; the model and whitening in patches_model"
          f"{'' if single else '_<annealing>'}.pt (pyro_esc.load)")


def _denoise(args):
    import numpy as np
    from PIL import Image

    from .data.images import read_image
    from .apps.denoising import denoise
    from .saving import load

    model = None
    if args.dictionary is not None:
        with pyro.get_param_store().scope():
            model = load(args.dictionary).model
    image = read_image(args.input)
    result = denoise(image, args.patch_size, model=model, n_latents=args.latents, seed=args.seed, steps=args.steps,
                     progress=not args.quiet)

    def write(path, array):
        Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)

    write(args.output, result.image)
    if args.noise_image is not None:
        write(args.noise_image, 0.5 + (image - result.image))
    print(f"denoised {args.input} ({image.shape[0]}x{image.shape[1]}) into {args.output}; learned noise "
          f"standard deviation {result.noise_std:.4f} (patch means removed)")


def _reproduce(args):
    out = args.out or os.path.join("figures", "quick" if args.quick else "")
    start = time.perf_counter()
    metrics = experiments.reproduce(out=out, quick=args.quick, seed=args.seed, device=args.device,
                                    progress=not args.quiet)
    for run in metrics["bars"]:
        print(f"bars, {experiments.GUIDE_LABELS[run['guide']]}: {run['bars_found']} of 10 bars, "
              f"ELBO {run['elbo']:.4f}, {run['wall_time_s']:.0f} s")
    for label, run in metrics["patches"].items():
        print(f"patches, {label}: ELBO {run['elbo']:.4f}, kurtosis {run['sparseness']['kurtosis']:.2f}, "
              f"field spread {run['mean_field_spread_px']:.2f} px")
    print(f"figures and metrics.json in {out} ({time.perf_counter() - start:.0f} s)")


def _check_paths_and_device(args):
    """What can be checked before any training: the device, the files read and the places written."""
    check_device(getattr(args, "device", None), "--device")
    for option in ("input", "dictionary"):
        path = getattr(args, option, None)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{'--' * (option != 'input')}{option}: no such file: {path!r}")
    if getattr(args, "out", None) is not None:
        _check_writable_folder(args.out, "--out")
    for option in ("output", "noise_image"):
        path = getattr(args, option, None)
        if path is not None:
            _check_writable_folder(os.path.dirname(os.path.abspath(path)), f"{'--' * (option != 'output')}"
                                   f"{option.replace('_', '-')}")


def _check_writable_folder(folder, option):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option}: cannot create the folder {folder!r} ({error.strerror}); choose another") from None
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: cannot write into {folder!r}; choose a writable folder")


def main(argv=None):
    """Run ``pyro-esc``; returns the exit code: 0, or 2 for a usage error, found before any training."""
    args = build_parser().parse_args(argv)
    try:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        _check_paths_and_device(args)
        torch.set_num_threads(args.threads)
        args.run(args)
    except ValueError as error:
        print(f"pyro-esc {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
