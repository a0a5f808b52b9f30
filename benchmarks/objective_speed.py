"""Time per optimisation step: EntropyELBO vs Trace_ELBO vs a plain-PyTorch loop.

All optimise the same model and AutoNormal-shaped guide on bars data
(N=1000, D=25, H=10) with Adam. The plain-PyTorch loop computes the same
objective, -N L_H, from raw tensors with one torch.optim.Adam: it is the floor
that Pyro's machinery (param store, SVI, per-parameter optimisers) adds to.
A fourth line, "SVI floor", runs the plain loop's arithmetic as a minimal
``pyro.infer.ELBO`` inside ``SVI`` (same AutoNormal, same pyro.optim.Adam): the
cost of Pyro's machinery alone, which any SVI objective pays. EntropyELBO's
distance from it is what the library itself adds (dispatch to the guide
adapter, input checks). An SVI step with EntropyELBO no longer writes lambda*,
sigma^2* into the model; fit does that with EntropyELBO.update after the step,
which is not timed here.

Timings are interleaved in rounds and the median per-step time is reported,
so that machine noise hits all three alike. Run:

    python benchmarks/objective_speed.py [--steps 200] [--rounds 7]

A fifth line trains the same EntropyELBO as Pyro's ``ELBOModule`` (``EntropyELBO()(model, guide)``,
an ``nn.Module``) with one ``torch.optim.Adam``, as Pyro's svi_lightning example and fit's torch route do.

Targets: EntropyELBO through SVI <= 0.35 x a Trace_ELBO step; the ELBOModule route <= 1.2 x the plain loop.
"""

import argparse
import math
import statistics
import time

import torch

import pyro
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import pyro_method

from pyro_esc import EntropyELBO, SparseCoding
from pyro_esc.data import bars
from pyro_esc.gaussian import (
    entropy_from_scale,
    folded_normal_mean,
    isotropic_normal_entropy,
    laplace_entropy,
)


def svi_timer(loss, x, lr):
    """Times SVI steps on a model and guide of their own, in a private param-store scope.

    Models and guides of the same class share param names; the scope keeps the
    runs apart. It is entered once per timing round, outside the timed loop.
    """
    store = pyro.get_param_store()
    with store.scope() as state:
        pyro.set_rng_seed(0)
        model = SparseCoding(x.size(1), 10)
        guide = AutoNormal(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=loss)

    def run(steps):
        with store.scope(state):
            return time_steps(lambda: svi.step(x), steps)

    return run


def entropy_objective(x, loc, scale, dictionary):
    """-N L_H for per-point diagonal Gaussians: the arithmetic of the plain loop, nothing else."""
    num, dim = x.shape
    prior_scale = folded_normal_mean(loc, scale).sum(0) / num
    sq_error = (x - loc @ dictionary.T).square().sum() + scale.square().sum(0) @ dictionary.square().sum(0)
    noise_var = sq_error / (num * dim)
    elbo = entropy_from_scale(scale).sum() / num - laplace_entropy(prior_scale) - isotropic_normal_entropy(noise_var, dim)
    return -num * elbo


# PyroModule params reach SVI's optimiser only when read inside the module's Pyro context.
_guide_params = pyro_method(lambda guide: (guide.locs.z, guide.scales.z))
_dictionary = pyro_method(lambda model: model.dictionary)


class InlineEntropyELBO(pyro.infer.ELBO):
    """The plain loop's arithmetic as an SVI loss: reads AutoNormal's and the model's params, no more."""

    def differentiable_loss(self, model, guide, x):
        if not hasattr(guide, "locs"):
            guide(x)  # AutoNormal's lazy set-up, first step only
        loc, scale = _guide_params(guide)
        return entropy_objective(x, loc, scale, _dictionary(model))

    def loss(self, model, guide, x):
        with torch.no_grad():
            return self.differentiable_loss(model, guide, x).item()

    def loss_and_grads(self, model, guide, x):
        loss = self.differentiable_loss(model, guide, x)
        loss.backward()
        return loss.item()

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("closed form: no traces")


def module_timer(loss, x, lr):
    """Pyro's ``ELBOModule`` (``loss(model, guide)``, a torch.nn.Module) trained by one torch.optim.Adam.

    The route of Pyro's svi_lightning example and of :func:`~pyro_esc.fit`'s torch route: no SVI, no
    param-capture trace; the module's parameters are the model's and guide's own.
    """
    store = pyro.get_param_store()
    with store.scope() as state:
        pyro.set_rng_seed(0)
        model = SparseCoding(x.size(1), 10)
        guide = AutoNormal(model)
        module = loss(model, guide)
        module(x)  # lazy set-up of the guide's and the model's parameters
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)

    def step():
        optimizer.zero_grad()
        value = module(x)
        value.backward()
        optimizer.step()
        return value.item()

    def run(steps):
        with store.scope(state):
            return time_steps(step, steps)

    return run


def plain_timer(x, hidden, lr):
    """The same objective and parameterisation as AutoNormal + SparseCoding, in raw torch."""
    torch.manual_seed(0)
    num, dim = x.shape
    loc = torch.zeros(num, hidden, requires_grad=True)
    scale_raw = torch.full((num, hidden), math.log(math.expm1(0.1)), requires_grad=True)
    raw_dictionary = x[torch.randperm(num)[:hidden]].T.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([loc, scale_raw, raw_dictionary], lr=lr)

    def step():
        optimizer.zero_grad()
        scale = torch.nn.functional.softplus(scale_raw)
        dictionary = raw_dictionary / raw_dictionary.norm(dim=0)
        loss = entropy_objective(x, loc, scale, dictionary)
        loss.backward()
        optimizer.step()
        return loss.item()

    return lambda steps: time_steps(step, steps)


def time_steps(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--n", type=int, default=1000, help="data points")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: small tensors, no contention)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    x, _ = bars(args.n, seed=0)
    timers = {
        "EntropyELBO (SVI)": svi_timer(EntropyELBO(), x, lr=0.05),
        "Trace_ELBO (SVI, 1 particle)": svi_timer(Trace_ELBO(), x, lr=0.05),
        "SVI floor (plain math in SVI)": svi_timer(InlineEntropyELBO(), x, lr=0.05),
        "EntropyELBO (ELBOModule + Adam)": module_timer(EntropyELBO(), x, lr=0.05),
        "plain PyTorch loop": plain_timer(x, 10, lr=0.05),
    }
    for run in timers.values():  # warm up: lazy initialisation, allocator
        run(20)
    times = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, run in timers.items():
            times[name].append(run(args.steps))
    median = {name: statistics.median(values) for name, values in times.items()}

    print(f"bars data N={args.n}, D={x.size(1)}, H=10, AutoNormal-shaped guide, Adam; "
          f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads")
    print(f"median over {args.rounds} rounds of {args.steps} steps:")
    for name, value in median.items():
        print(f"  {name:30s} {value * 1e3:7.3f} ms/step")
    entropy = median["EntropyELBO (SVI)"]
    print(f"ratio EntropyELBO / Trace_ELBO : {entropy / median['Trace_ELBO (SVI, 1 particle)']:.3f}  (target <= 0.35)")
    print(f"ratio EntropyELBO / plain loop : {entropy / median['plain PyTorch loop']:.3f}  (target <= 1.2)")
    module = median["EntropyELBO (ELBOModule + Adam)"]
    print(f"ratio ELBOModule  / plain loop : {module / median['plain PyTorch loop']:.3f}  (target <= 1.2)")
    floor = median["SVI floor (plain math in SVI)"]
    print(f"ratio SVI floor   / plain loop : {floor / median['plain PyTorch loop']:.3f}  (Pyro's machinery alone)")
    print(f"ratio EntropyELBO / SVI floor  : {entropy / floor:.3f}  (what pyro_esc adds on top of SVI)")
    return median


if __name__ == "__main__":
    main()
