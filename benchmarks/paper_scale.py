"""Minibatch steps at paper scale: ms per step and s per epoch against a bare-PyTorch floor.

The authors' natural-image setting: D = 256 (16x16 patches), H = 100, per-point
diagonal posteriors (AutoNormal), minibatches of 512, EntropyELBO with running
statistics. For each N it measures, in one run and on one core:

- ``fit``: the library's row-wise route (``optimizer="rowwise"``) with ``inner_steps=1`` (one update of the batch's
  rows and the dictionary per step, the same work as the floor), timed per step
  through fit's callback; and with fit's default ``inner_steps`` (4 updates of the
  batch's posteriors per step), whose epoch time is what ``pyro-esc patches``
  takes;
- ``svi`` (only where N is small enough to wait for): the SVI route, whose dense
  Adam touches every point's parameters each step;
- ``floor``: the same objective as a bare PyTorch loop that touches only the
  batch's rows: gather the rows, evaluate -N L_H with running totals, backward,
  Adam on the rows (state per row) and on the dictionary, store the rows. It is
  written from the formulas, sharing no code with the library.

Every line runs in a fresh subprocess, so that its peak resident memory (RSS)
is its own; bytes per point come from the slope of fit's peak memory over N.
The step time is the median over the timed steps. An epoch is N / 512 steps;
fit's epoch time adds the exact full-data ELBO it records once an epoch,
measured separately ("eval pass"). Peak memory is the larger of fit's two lines. Data are random (the cost does not depend on
the values). Run:

    python benchmarks/paper_scale.py [--sizes 20000 204800 1000000] [--steps 60]
"""

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

D, H, BATCH = 256, 100, 512


def data(n):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, D, generator=generator)


def time_fit(n, steps, optimizer, inner_steps=None):
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal

    from pyro_esc import SparseCoding, fit
    from pyro_esc.evaluation import training_elbo

    x = data(n)
    pyro.set_rng_seed(0)
    model = SparseCoding(D, H)
    guide = AutoNormal(model, create_plates=model.create_plates)
    stamps = []
    fit(model, guide, x, batch_size=BATCH, steps=steps, optimizer=optimizer, progress=False, inner_steps=inner_steps,
        eval_every=10 ** 9, callback=lambda step, history: stamps.append(time.perf_counter()))
    # The last step also ran the final exact evaluation: leave it out, and the first few (warm-up).
    per_step = [b - a for a, b in zip(stamps[5:-2], stamps[6:-1])]
    start = time.perf_counter()
    with torch.no_grad():
        training_elbo(model, guide, x)
    return {"ms_per_step": 1e3 * statistics.median(per_step), "eval_pass_s": time.perf_counter() - start}


def time_floor(n, steps):
    """The bare loop: only the batch's rows are read, differentiated and written."""
    import torch

    x = data(n)
    torch.manual_seed(0)
    loc = torch.zeros(n, H)
    raw_scale = torch.full((n, H), math.log(math.expm1(0.1)))  # softplus^-1(0.1)
    raw_w = x[torch.randperm(n)[:H]].T.clone().requires_grad_()
    w_optim = torch.optim.Adam([raw_w], lr=0.05)
    params = [loc, raw_scale]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    counts = torch.zeros(n, dtype=torch.long)
    # Running table and its totals (float64).
    entropy_rows = torch.zeros(n)
    abs_rows = torch.zeros(n, H)
    sq_rows = torch.zeros(n)
    totals = [torch.zeros((), dtype=torch.float64), torch.zeros(H, dtype=torch.float64),
              torch.zeros((), dtype=torch.float64)]
    order = torch.randperm(n)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        index = order[(step * BATCH) % n:(step * BATCH) % n + BATCH]
        x_b = x.index_select(0, index)
        rows = [p.index_select(0, index).requires_grad_() for p in params]
        mean, scale = rows[0], torch.nn.functional.softplus(rows[1])
        w = raw_w / raw_w.norm(dim=0)
        # Per-point statistics of a diagonal Gaussian under the Laplace-prior sparse coding model.
        ent = scale.log().sum(-1) + 0.5 * H * math.log(2 * math.pi * math.e)
        ratio = mean / scale
        abs_mean = (scale * math.sqrt(2 / math.pi) * torch.exp(-0.5 * ratio ** 2)
                    + mean * torch.erf(ratio / math.sqrt(2)))
        sq = (x_b - mean @ w.T).square().sum(-1) + (scale.square() * w.square().sum(0)).sum(-1)
        gain = n / BATCH
        mixed = []
        for total, stored, current in zip(totals, (entropy_rows, abs_rows, sq_rows), (ent, abs_mean, sq)):
            current_sum = current.sum(0)
            others = (total - stored.index_select(0, index).double().sum(0)).float()
            mixed.append(others + current_sum * gain - (current_sum * (gain - 1)).detach())
        prior_scale, noise_var = mixed[1] / n, mixed[2] / (n * D)
        elbo = (mixed[0] / n - torch.log(2 * math.e * prior_scale).sum()
                - 0.5 * D * torch.log(2 * math.pi * math.e * noise_var))
        grads = torch.autograd.grad(-elbo, rows + [raw_w])
        with torch.no_grad():
            for total, stored, current in zip(totals, (entropy_rows, abs_rows, sq_rows), (ent, abs_mean, sq)):
                total += current.detach().double().sum(0) - stored.index_select(0, index).double().sum(0)
                stored.index_copy_(0, index, current.detach())
            t = counts.index_select(0, index) + 1
            counts.index_copy_(0, index, t)
            for p, (m, v), row, g in zip(params, moments, rows, grads[:2]):
                m_b = m.index_select(0, index).mul_(0.9).add_(g, alpha=0.1)
                v_b = v.index_select(0, index).mul_(0.999).addcmul_(g, g, value=0.001)
                m.index_copy_(0, index, m_b)
                v.index_copy_(0, index, v_b)
                tt = t.float().unsqueeze(-1)
                p.index_copy_(0, index, row - 0.05 * (m_b / (1 - 0.9 ** tt)) / ((v_b / (1 - 0.999 ** tt)).sqrt() + 1e-8))
            raw_w.grad = grads[2]
            w_optim.step()
        times.append(time.perf_counter() - start)
    return {"ms_per_step": 1e3 * statistics.median(times[5:])}


def child(args):
    import torch

    torch.set_num_threads(1)
    if args.child == "floor":
        result = time_floor(args.n, args.steps)
    elif args.child == "one":
        result = time_fit(args.n, args.steps, "rowwise", inner_steps=1)
    else:
        result = time_fit(args.n, args.steps, args.child)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run(kind, n, steps):
    output = subprocess.run([sys.executable, __file__, "--child", kind, "--n", str(n), "--steps", str(steps)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 204800, 1000000])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per line (default 60)")
    parser.add_argument("--svi-up-to", type=int, default=204800, help="largest N to time the SVI route at")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args)
    rows = []
    print(f"D = {D}, H = {H}, batch {BATCH}, AutoNormal, EntropyELBO (running statistics), one core")
    print("| N | fit ms/step (inner_steps=1) | floor ms/step | fit / floor | SVI ms/step | SVI / floor | "
          "s/epoch, inner_steps=1 | s/epoch, default (4) | eval pass s | fit peak MiB | floor peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        ours = run("one", n, args.steps)
        default = run("rowwise", n, max(10, args.steps // 2))
        floor = run("floor", n, args.steps)
        svi = run("svi", n, min(args.steps, 30)) if n <= args.svi_up_to else None
        steps_per_epoch = math.ceil(n / BATCH)
        rows.append({"n": n, "fit": ours, "default": default, "floor": floor, "svi": svi})
        print(f"| {n:,} | {ours['ms_per_step']:.1f} | {floor['ms_per_step']:.1f} | "
              f"{ours['ms_per_step'] / floor['ms_per_step']:.2f} | "
              f"{'-' if svi is None else format(svi['ms_per_step'], '.0f')} | "
              f"{'-' if svi is None else format(svi['ms_per_step'] / floor['ms_per_step'], '.0f')} | "
              f"{steps_per_epoch * ours['ms_per_step'] / 1e3:.1f} | "
              f"{steps_per_epoch * default['ms_per_step'] / 1e3:.1f} | {ours['eval_pass_s']:.1f} | "
              f"{max(ours['peak_rss_mib'], default['peak_rss_mib']):.0f} | {floor['peak_rss_mib']:.0f} |",
              flush=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        slope = ((last["fit"]["peak_rss_mib"] - first["fit"]["peak_rss_mib"]) * 2 ** 20
                 / (last["n"] - first["n"]))
        print(f"fit's peak memory grows by {slope:.0f} bytes per data point")


if __name__ == "__main__":
    main()
