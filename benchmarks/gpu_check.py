"""GPU check for pyro_esc.lightning: ms per training step at paper scale, GPU vs CPU, and DDP on 2 GPUs.

    python benchmarks/gpu_check.py                 # everything the machine allows
    python benchmarks/gpu_check.py --quick         # a small size, for a smoke run
    python benchmarks/gpu_check.py --skip-cpu      # GPU rows only (the CPU at paper scale is slow)

Paper scale here: whitened 12 x 12 patches (D = 144), H = 100 latents, N = 20,000 patches,
batches of 1,000 per process, float32; two guides: the amortised diagonal encoder
(AmortizedNormal, hidden (100,)) and per-point full covariances (LocalMultivariateNormal).

Rows (each the median ms per step over the timed steps, after warm-up steps):

- ``step``: the training step itself (SparseCodingModule.objective, backward, Adam) without
  a Trainer, on the CPU and on one GPU; the ratio CPU / GPU is printed;
- ``lightning``: the same inside ``lightning.pytorch.Trainer`` on one device (Lightning's
  per-step overhead shows as the difference);
- ``ddp x2``: Lightning DDP on 2 GPUs (strategy "ddp_spawn", the batches of both processes:
  twice the points per step), only when 2 GPUs are visible.

Without a GPU it prints the CPU rows and says which rows it skipped. Results go to stdout and,
with ``--out FILE``, to a JSON file.
"""

import argparse
import importlib.util
import json
import statistics
import time

import torch

import pyro


def _problem(args, device, guide_kind, seed=0):
    from pyro_esc import AmortizedNormal, EntropyELBO, LocalMultivariateNormal, SparseCoding
    from pyro_esc.lightning import SparseCodingDataModule, SparseCodingModule

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = torch.randn(args.n, args.size * args.size, generator=torch.Generator().manual_seed(seed))
    # Laplace-like heavy tails, as whitened patches have; the timing does not depend on the values.
    x = x * torch.distributions.Exponential(1.0).sample((args.n, 1))
    model = SparseCoding(x.size(1), args.latents)
    guide = (LocalMultivariateNormal(model) if guide_kind == "local-full"
             else AmortizedNormal(x.size(1), args.latents, hidden=(100,), covariance="diag"))
    data = SparseCodingDataModule(x, batch_size=args.batch_size, seed=seed)
    module = SparseCodingModule(EntropyELBO()(model, guide), lr=1e-3, scales_every_n_epochs=10 ** 6)
    return x, data, module


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(args, device, guide_kind):
    """Median ms per training step (objective, backward, Adam) without a Trainer."""
    _, data, module = _problem(args, device, guide_kind)
    data.setup_shard(0, 1)
    module.attach_shard(data)
    module.to(device)
    module._shard = module._shard.to(device)
    optimizer = module.configure_optimizers()
    batches = list(data.train_dataloader())
    times = []
    for step in range(args.warmup + args.steps):
        index, _ = batches[step % len(batches)]
        index = index.to(device)
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad()
        terms = module.objective(index)
        (-terms.num_data * terms.elbo).backward()
        optimizer.step()
        _sync(device)
        if step >= args.warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _step_timer():
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        def __init__(self, warmup):
            self.warmup, self.times, self._start = warmup, [], None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            if trainer.global_step > self.warmup:
                self.times.append(1e3 * (time.perf_counter() - self._start))
                # Logged, so that ddp_spawn hands rank 0's value back to the launching process.
                module.log("ms_per_step", statistics.median(self.times), rank_zero_only=True)

    return StepTimer


def time_lightning(args, accelerator, devices, strategy, guide_kind):
    """Median ms per step inside a Lightning Trainer (rank 0's measurement)."""
    import lightning.pytorch as pl

    _, data, module = _problem(args, None, guide_kind)
    timer = _step_timer()(args.warmup)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy,
                         max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    if timer.times:
        return statistics.median(timer.times)
    # ddp_spawn: the timings were taken in the workers; rank 0's logged median came back.
    value = trainer.callback_metrics.get("ms_per_step")
    return None if value is None else float(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--size", type=int, default=12)
    parser.add_argument("--latents", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--guides", default="amortized-diag,local-full")
    parser.add_argument("--quick", action="store_true", help="N 2000, H 30, 8 x 8 patches, 10 steps")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.n, args.latents, args.size, args.batch_size, args.steps, args.warmup = 2000, 30, 8, 200, 10, 3
    torch.set_float32_matmul_precision("high")

    if importlib.util.find_spec("lightning") is None:
        raise SystemExit("benchmarks/gpu_check.py needs the Lightning extra: pip install -e '.[lightning]'")

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch {torch.__version__}; CUDA devices: {gpus}"
          + (f" ({torch.cuda.get_device_name(0)})" if gpus else "; GPU rows skipped (no CUDA device)"))
    print(f"N={args.n}, D={args.size ** 2}, H={args.latents}, batch {args.batch_size} per process, float32, "
          f"median of {args.steps} steps after {args.warmup}")
    results = []

    def report(row, guide, value, note=""):
        results.append({"row": row, "guide": guide, "ms_per_step": value, "note": note})
        shown = "skipped" if value is None else f"{value:9.2f} ms/step"
        print(f"  {row:<22} {guide:<16} {shown} {note}", flush=True)

    for guide in args.guides.split(","):
        cpu = None
        if args.skip_cpu:
            report("step, CPU", guide, None, "(--skip-cpu)")
        else:
            cpu = time_step(args, torch.device("cpu"), guide)
            report("step, CPU", guide, cpu, f"({torch.get_num_threads()} threads)")
            report("lightning, CPU", guide, time_lightning(args, "cpu", 1, "auto", guide))
        if gpus:
            gpu = time_step(args, torch.device("cuda:0"), guide)
            report("step, 1 GPU", guide, gpu, "" if cpu is None else f"(CPU / GPU = {cpu / gpu:.1f}x)")
            report("lightning, 1 GPU", guide, time_lightning(args, "gpu", 1, "auto", guide))
        else:
            report("step, 1 GPU", guide, None, "(no CUDA device)")
        if gpus >= 2:
            value = time_lightning(args, "gpu", 2, "ddp_spawn", guide)
            report("lightning ddp x2 GPUs", guide, value, "(2x the points per step)")
        else:
            report("lightning ddp x2 GPUs", guide, None, f"(needs 2 GPUs, {gpus} visible)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "gpus": gpus, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
