"""pyro_esc.lightning: the LightningModule and data module, on one process and under DDP (CPU, gloo).

The independent reference is the single-process EntropyELBO on the union of the ranks'
batches (Pyro's differentiable_loss / loss_and_grads and torch.autograd), never the module
compared with itself. The DDP part runs in one spawn of 2 processes that execute every
DDP check in turn (each process starts Lightning once; that start-up dominates the cost).
"""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402

import pyro  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402

from pyro_esc import AmortizedNormal, EntropyELBO, LocalMultivariateNormal, SparseCoding  # noqa: E402
from pyro_esc.data import bars  # noqa: E402
from pyro_esc.lightning import SparseCodingDataModule, SparseCodingModule, shard_ranges  # noqa: E402
from pyro_esc.metrics import bars_recovery  # noqa: E402

WORLD = 2
SIDE = 3  # equality problems: 3x3 bars, H = 6
NUM = 14  # points; shards of 7 and 7 with 2 ranks
# The bars run under DDP: 4x4 bars (H = 8), N = 800, sigma 0.2, full-batch Adam (lr 0.2 decaying to
# 0.04 over 1200 steps). Full-batch Adam is slow on bars (the library's reliable route is L-BFGS with
# restarts, which cannot run under DDP: each rank's line search would take its own decisions), so
# this recipe finds every bar on some seeds only; seed 2 is one of them (a sweep is in the report of
# docs/lightning.md). On the CPU with gloo the run is deterministic.
BARS = dict(n=800, side=4, noise=0.2, seed=2, steps=1200, lr=0.2)

# name -> (guide factory, batch size, minibatch statistics)
CONFIGS = {
    "local-full-batch": ("local", None, "running"),
    "amortized-full-batch": ("amortized", None, "running"),
    "autonormal-running": ("autonormal", 3, "running"),
    "amortized-batch-mode": ("amortized", 3, "batch"),
}


def _make_guide(kind, model):
    if kind == "local":
        return LocalMultivariateNormal(model)
    if kind == "autonormal":
        return AutoNormal(model, create_plates=model.create_plates)
    return AmortizedNormal(model.data_dim, model.n_latents, hidden=(5,), covariance="full")


def _problem(kind, x):
    """The union's model and guide at fixed random parameters (the same in every process)."""
    pyro.clear_param_store()
    torch.manual_seed(11)
    model = SparseCoding(x.size(1), 2 * SIDE)
    model.set_dictionary(torch.randn(x.size(1), 2 * SIDE))
    guide = _make_guide(kind, model)
    guide(x)  # lazy parameters, on all N points
    with torch.no_grad():
        for param in guide.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model, guide


def _quiet_trainer(max_steps, devices, strategy="auto"):
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)


class _Capture(pl.Callback):
    """Lightning callback: the first step's loss, gradients (after DDP's reduction) and batch indices."""

    def __init__(self):
        self.record = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if "index" not in self.record:
            self.record["index"] = batch[0].clone()

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if "grads" not in self.record:
            self.record["grads"] = {name: p.grad.detach().clone() for name, p in module.named_parameters()
                                    if p.grad is not None}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if "loss" not in self.record:
            self.record["loss"] = float(outputs["loss"].detach())


def _ddp_worker(rank, port, out):
    """One DDP process: every equality config, then the bars run; results saved to out/rank{k}.pt."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    import warnings

    warnings.filterwarnings("ignore")
    x, _ = bars(NUM, side=SIDE, seed=5)
    results = {}
    for name, (kind, batch_size, mode) in CONFIGS.items():
        model, guide = _problem(kind, x)
        data = SparseCodingDataModule(x, batch_size=batch_size, seed=3)
        data.setup_shard(rank, WORLD)
        rows = data.shard_indices
        if kind != "amortized":
            # The rank's per-point guide holds its own rows of the union's parameters only. (A new
            # param store first: Pyro names both guides alike, and a store entry would be adopted.)
            union = [param.detach().clone() for param in guide.parameters()]
            pyro.clear_param_store()
            shard_guide = _make_guide(kind, model)
            shard_guide(data.shard)
            with torch.no_grad():
                for mine, values in zip(shard_guide.parameters(), union):
                    mine.copy_(values[rows])
            guide = shard_guide
        module = SparseCodingModule(EntropyELBO(minibatch_statistics=mode)(model, guide), lr=1e-3)
        capture = _Capture()
        trainer = _quiet_trainer(1, WORLD, "ddp")
        trainer.callbacks.append(capture)
        trainer.fit(module, datamodule=data)
        record = capture.record
        record["index"] = rows[record["index"].cpu()]  # global indices of this rank's batch
        record["rows"] = rows
        results[name] = record

    # The bars run: unbuilt per-point guide, parameters created on each rank's shard in setup.
    pyro.clear_param_store()
    pyro.set_rng_seed(BARS["seed"])
    x, true_dictionary = bars(BARS["n"], side=BARS["side"], noise=BARS["noise"], seed=BARS["seed"])
    model = SparseCoding(x.size(1), true_dictionary.size(1))
    guide = LocalMultivariateNormal(model)
    steps, gamma = BARS["steps"], 0.2 ** (1 / BARS["steps"])
    module = SparseCodingModule(EntropyELBO()(model, guide), lr=BARS["lr"], scales_every_n_epochs=steps,
                                scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma))
    start = time.perf_counter()
    _quiet_trainer(steps, WORLD, "ddp").fit(module, datamodule=SparseCodingDataModule(x))
    results["bars"] = {"dictionary": model.dictionary.detach().clone(), "elbo": module.update_scales(log=False),
                       "wall_time": time.perf_counter() - start, "guide_rows": guide.locs.z_unconstrained.size(0),
                       "prior_scale": model.prior_scale.detach().clone()}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    print(f"DDP spawn with {WORLD} processes: {time.perf_counter() - start:.1f} s")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _reference(name, union_index):
    """Single-process EntropyELBO on the union of the ranks' batches: loss and gradients."""
    kind, _, mode = CONFIGS[name]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x, _ = bars(NUM, side=SIDE, seed=5)
        model, guide = _problem(kind, x)
        params = {"raw_dictionary": model.raw_dictionary_unconstrained}
        params.update({name: p for name, p in guide.named_parameters()})
        elbo = EntropyELBO(minibatch_statistics=mode)
        union_index = torch.sort(union_index).values
        kwargs = {} if union_index.numel() == NUM else {"subsample": union_index}
        # loss_and_grads: SVI's training call (builds the running table at the current parameters).
        loss = elbo.loss_and_grads(model, guide, x, **kwargs)
        return loss, {name: p.grad.clone() for name, p in params.items()}
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_loss_and_every_gradient_equal_single_process_on_the_union(ddp_results, name):
    records = [results[name] for results in ddp_results]
    union_index = torch.cat([record["index"] for record in records])
    assert torch.unique(union_index).numel() == union_index.numel()  # the ranks' batches are disjoint
    loss, grads = _reference(name, union_index)
    kind = CONFIGS[name][0]
    worst = 0.0
    for record in records:
        assert abs(record["loss"] - loss) < 1e-6 * max(1.0, abs(loss)), (record["loss"], loss)
        got = record["grads"]
        (dictionary_name,) = [key for key in got if key.endswith("raw_dictionary_unconstrained")]
        worst = max(worst, float((got[dictionary_name] - grads["raw_dictionary"]).abs().max()))
        guide_names = [key for key in got if ".guide." in key]
        assert len(guide_names) == len(grads) - 1  # every guide parameter has a gradient
        for key in guide_names:
            reference = grads[key.split(".guide.", 1)[1]]
            if kind != "amortized":
                reference = reference[record["rows"]]  # the rank's own points' rows
            assert got[key].shape == reference.shape
            worst = max(worst, float((got[key] - reference).abs().max()))
    print(f"{name}: loss {loss:.6f}, max |grad - single-process grad| = {worst:.2e}")
    assert worst < 1e-6


def test_bars_under_ddp_finds_every_bar(ddp_results):
    first, second = (results["bars"] for results in ddp_results)
    # Each rank holds the per-point parameters of its own points only ...
    assert [first["guide_rows"], second["guide_rows"]] == [len(r) for r in shard_ranges(BARS["n"], WORLD)]
    # ... and the shared dictionary and scales are the same on every rank.
    assert torch.equal(first["dictionary"], second["dictionary"])
    assert torch.equal(first["prior_scale"], second["prior_scale"])
    _, true_dictionary = bars(BARS["n"], side=BARS["side"], noise=BARS["noise"], seed=BARS["seed"],
                              dtype=torch.float64)
    recovery = bars_recovery(first["dictionary"], true_dictionary)
    print(f"bars under DDP: {recovery.num_found} of {true_dictionary.size(1)} found, ELBO {first['elbo']:.4f}, "
          f"min cos {float(recovery.cosines.min()):.4f}, fit {first['wall_time']:.1f} s")
    assert recovery.all_found, recovery.cosines


# ------------------------------------------------------------------ one process


def test_single_process_smoke_run_matches_entropy_elbo_and_learns(float64):
    x, _ = bars(40, side=SIDE, seed=2)
    model = SparseCoding(x.size(1), 2 * SIDE)
    guide = LocalMultivariateNormal(model)
    data = SparseCodingDataModule(x, batch_size=20, seed=1)
    module = SparseCodingModule(EntropyELBO()(model, guide), lr=0.03)
    capture = _Capture()
    start = {}

    class Start(pl.Callback):
        def on_train_start(self, trainer, module):
            start["elbo"] = float(EntropyELBO().terms(model, guide, x).elbo)

    trainer = _quiet_trainer(80, 1)
    trainer.callbacks.extend([capture, Start()])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 80
    # The first step's loss is EntropyELBO's on the same batch (the running table is fresh).
    index = capture.record["index"]
    first = capture.record["loss"]
    elbo = module.update_scales(log=False)
    # Independent route: EntropyELBO's exact full-data value, and its lambda*, sigma^2*.
    reference = EntropyELBO().terms(model, guide, x)
    assert abs(elbo - float(reference.elbo)) < 1e-9
    assert torch.allclose(model.prior_scale, reference.prior_scale, rtol=1e-9)
    assert torch.allclose(model.noise_var, reference.noise_var, rtol=1e-9)
    assert index.numel() == 20 and abs(first / x.size(0) + start["elbo"]) < 1e-9
    print(f"single process: ELBO {start['elbo']:.4f} -> {elbo:.4f} in 80 steps")
    assert elbo > start["elbo"] + 0.05


def test_data_module_shards_are_fixed_and_batches_equal_in_number():
    x = torch.randn(11, 4)
    shards = []
    for rank in range(3):
        data = SparseCodingDataModule(x, batch_size=2, seed=0)
        data.setup_shard(rank, 3)
        shards.append(data.shard_indices)
        epochs = [list(data.train_dataloader()) for _ in range(2)]
        assert [len(batches) for batches in epochs] == [2, 2]  # ceil(ceil(11 / 3) / 2) for every rank
        for batches in epochs:
            seen = torch.cat([index for index, _ in batches])
            assert sorted(seen.tolist()) == list(range(len(data.shard_indices)))  # each row once per epoch
            for index, x_batch in batches:
                assert torch.equal(x_batch, x[data.shard_indices[index]])
        with pytest.raises(ValueError, match="fixed"):
            data.setup_shard((rank + 1) % 3, 3)
    assert torch.equal(torch.cat(shards), torch.arange(11))


def test_bad_input_names_the_argument(tmp_path):
    model = SparseCoding(4, 2)
    loss_fn = EntropyELBO()(model, LocalMultivariateNormal(model))
    with pytest.raises(ValueError, match="loss_fn"):
        SparseCodingModule(lambda x: x)
    with pytest.raises(ValueError, match="lr"):
        SparseCodingModule(loss_fn, lr=-1)
    with pytest.raises(ValueError, match="sharded"):
        SparseCodingModule(loss_fn, sharded="yes")
    with pytest.raises(ValueError, match="batch_size"):
        SparseCodingDataModule(torch.randn(5, 4), batch_size=0)
    with pytest.raises(ValueError, match="x"):
        SparseCodingDataModule(torch.full((5, 4), float("nan")))
    with pytest.raises(ValueError, match="batch_size"):
        SparseCodingDataModule(torch.randn(5, 4), batch_size=1).setup_shard(0, 2)  # 3 batches, a shard of 2
    with pytest.raises(ValueError, match="world_size"):
        shard_ranges(3, 4)
    with pytest.raises(ValueError, match="whitening"):
        SparseCodingDataModule.from_patches(50, size=4, whitening="pcs")
    with pytest.raises(ValueError, match="path"):
        SparseCodingDataModule.from_image_folder(tmp_path / "missing", 10)


def test_patches_and_array_sources(tmp_path):
    import numpy as np

    data = SparseCodingDataModule.from_patches(60, size=4, batch_size=20)
    assert tuple(data.x.shape) == (60, 16) and torch.isfinite(data.x).all()
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(9, 3)))
    assert tuple(SparseCodingDataModule.from_array(tmp_path / "x.npy").x.shape) == (9, 3)


def test_import_pyro_esc_does_not_import_lightning():
    code = "import sys, pyro_esc; assert not any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
