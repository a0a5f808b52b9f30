"""The ``pyro-esc`` command line."""

import argparse
import sys
import time

import torch

import pyro
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

from .data import bars
from .model import SparseCoding
from .objectives import EntropyELBO


def _bars(args):
    pyro.set_rng_seed(args.seed)
    x, true_dictionary = bars(args.n, side=args.side, noise=args.noise, seed=args.seed)
    model = SparseCoding(x.size(1), true_dictionary.size(1))
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), loss=EntropyELBO())
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = svi.step(x)
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:5d}  L_H per data point {-loss / x.size(0):9.4f}  "
                  f"sigma^2* {float(model.noise_var.detach()):.4f}")
    overlap = (model.dictionary.detach().T @ true_dictionary).abs().max(0).values
    print(f"{int((overlap > 0.95).sum())} of {true_dictionary.size(1)} bars found "
          f"(best cosine per bar > 0.95) in {time.perf_counter() - start:.1f} s")


def build_parser():
    parser = argparse.ArgumentParser(prog="pyro-esc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bars_parser = commands.add_parser("bars", help="learn the bars test with EntropyELBO")
    bars_parser.add_argument("--n", type=int, default=1000, help="data points")
    bars_parser.add_argument("--side", type=int, default=5, help="image side (H = 2 side bars)")
    bars_parser.add_argument("--noise", type=float, default=0.3, help="noise standard deviation")
    bars_parser.add_argument("--steps", type=int, default=1000, help="Adam steps")
    bars_parser.add_argument("--lr", type=float, default=0.05, help="learning rate")
    bars_parser.add_argument("--seed", type=int, default=0, help="random seed")
    bars_parser.set_defaults(run=_bars)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_default_dtype(torch.float32)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
