r"""Training on PyTorch Lightning: one device, several GPUs, several machines (DDP).

An optional extra (``pip install -e '.[lightning]'`` in a checkout); ``import pyro_esc`` never
imports it. It follows Pyro's ``examples/svi_lightning.py``: the objective is an
``ELBOModule`` (``EntropyELBO()(model, guide)``), its parameters exist before the
Trainer builds the optimiser, and a LightningModule turns it into training steps.

**Why DDP needs more than averaging gradients.** The entropy-based objective
(Theorems 1-2 of Velychko et al., AISTATS 2024) is not a sum over data points: it
depends on the guide and the dictionary through three whole-data sums::

    S_H   = sum_n H[q^(n)]          S_|z| = sum_n E_q|z^(n)|  (H,)
    S_sq  = sum_n E_q||x^(n) - W z||^2

    -N L_H = -S_H + N sum_h log(2 e S_|z|,h / N) + N D/2 log(2 pi e S_sq / (N D))

(lambda* = S_|z| / N and sigma^2* = S_sq / (N D) are Theorem 2's scales). With the
data split over K processes, rank k computes the sums s_k over its own points. Each
rank forms the union's sums ``S_k = s_k + (all_reduce(s_k.detach()) - s_k.detach())``:
the *value* is the union's S = sum_j s_j on every rank, the *gradient* flows through
the rank's own s_k only (the all-reduced tensor is detached, so there is no
differentiable all-reduce whose backward would multiply by K). Then, with
f(S) = -N L_H,

- the loss value f(S) is the single-process loss on the union, on every rank;
- a per-point parameter theta_k of rank k gets df/dS ds_k/dtheta_k, which is the whole
  single-process gradient (no other rank's points depend on it). These parameters are
  excluded from DDP (``_ddp_params_and_buffers_to_ignore``), so DDP neither broadcasts
  nor averages them: every rank owns its points' parameters;
- a shared parameter (the dictionary, an encoder's weights) gets df/dS ds_k/dW on rank k;
  the single-process gradient is the *sum* over ranks. DDP averages by default, so the
  module registers a DDP communication hook that sums instead (:func:`sum_gradients_hook`).

So after backward every rank holds exactly the single-process loss and gradients of the
union of the K batches, and every optimiser step equals the single-process one.

Minibatches follow :class:`~pyro_esc.EntropyELBO`'s ``minibatch_statistics``:
``"running"`` keeps a per-point table of each rank's shard (the stored rows of the
other points are all-reduced with the batch's current rows; the batch's gradient is
scaled by N / B with B the union's batch size), ``"batch"`` uses the union's batch
alone. Both equal the single-process EntropyELBO on the union (for ``"running"``, with
equal tables). Theorem 2's lambda*, sigma^2* are written into the model (the one state
change, ``model.assign_scales``) from an exact all-reduced pass over all the data at the
start of training and after every ``scales_every_n_epochs`` epochs, which also logs the
exact ELBO per data point as ``elbo``.

**Data.** :class:`SparseCodingDataModule` gives every rank a fixed, contiguous shard of
the data (not re-drawn each epoch, because per-point parameters live on their rank) and
yields ``(index, x_batch)`` with ``index`` the rows of the rank's shard; every rank takes
the same number of batches per epoch (their sizes differ by at most one), as DDP needs.
"""

import math
import numbers
import os

import torch

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("pyro_esc.lightning needs PyTorch Lightning (lightning >= 2.1): "
                      "pip install -e '.[lightning]' in a checkout of pyro_esc") from error

import torch.distributed as dist
from pyro.infer.autoguide import AutoGuide
from pyro.infer.elbo import ELBOModule
from torch.nn.parallel import DistributedDataParallel

from .._checks import check_data, check_int
from ..infer.objectives import EntropyELBO, entropy_terms
from ..infer.statistics import BatchStatistics, PointStatistics, RunningStatistics, check_distinct, read_posterior
from ..models.sparse_coding import SparseCoding
from ..variational.posterior import gaussian_posterior

__all__ = ["SparseCodingDataModule", "SparseCodingModule", "all_reduce_sum", "shard_ranges",
           "sum_gradients_hook"]


# ------------------------------------------------------------------ collectives


def _world():
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor):
    """The sum of ``tensor`` over all processes (a detached copy; ``tensor`` itself is unchanged).

    Without a process group (one process) it is a detached copy. The result carries no
    gradient on purpose: a differentiable all-reduce would send every rank's gradient
    back to every rank, multiplying the gradients by K.
    """
    total = tensor.detach().clone()
    if _world()[1] > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def sum_gradients_hook(process_group, bucket):
    """DDP communication hook: all-reduce the gradients as a **sum**, not DDP's average.

    The objective's value on every rank is the union's, and rank k's backward gives the
    shared parameters the contribution of its own points; the union's gradient is the sum
    of the contributions. Register with ``ddp_model.register_comm_hook(None, sum_gradients_hook)``
    (:class:`SparseCodingModule` does so itself).
    """
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def shard_ranges(num_data, world_size):
    """The contiguous index ranges of the K shards: sizes floor(N/K) or ceil(N/K), rank order.

    :returns: list of K ``range`` objects covering 0..N-1.
    """
    num_data = check_int(num_data, "num_data")
    world_size = check_int(world_size, "world_size")
    if world_size > num_data:
        raise ValueError(f"world_size ({world_size}) must not exceed the number of data points ({num_data})")
    base, extra = divmod(num_data, world_size)
    bounds = [0]
    for rank in range(world_size):
        bounds.append(bounds[-1] + base + (1 if rank < extra else 0))
    return [range(bounds[k], bounds[k + 1]) for k in range(world_size)]


# ------------------------------------------------------------------ data


class _ShardBatches(torch.utils.data.IterableDataset):
    # An iterable dataset, so Lightning does not put its own DistributedSampler in front of it
    # (which would re-shard, pad with duplicates and reshuffle across ranks every epoch).

    def __init__(self, shard, num_batches, shuffle, seed):
        super().__init__()
        self.shard, self.num_batches, self.shuffle, self.seed = shard, num_batches, shuffle, seed
        self.epoch = 0

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        size = self.shard.size(0)
        if self.shuffle and self.num_batches > 1:
            generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
            order = torch.randperm(size, generator=generator)
        else:
            order = torch.arange(size)
        self.epoch += 1
        # tensor_split: exactly num_batches batches whose sizes differ by at most one.
        for index in torch.tensor_split(order, self.num_batches):
            yield index, self.shard.index_select(0, index)


class SparseCodingDataModule(pl.LightningDataModule):
    r"""Data for :class:`SparseCodingModule`: one fixed shard per process, batches of ``(index, x_batch)``.

    With K processes (DDP), rank k holds the contiguous rows ``shard_ranges(N, K)[k]`` of
    the data (:attr:`shard_indices`), for the whole run: per-point guide parameters live
    on the rank that holds their points. ``index`` are row numbers in the rank's shard
    (with one process: in the data). Each epoch every rank draws a fresh order of its own
    rows and cuts it into the same number of batches, M = ceil(ceil(N / K) / batch_size),
    so no rank waits for a step that another never takes.

    :param x: the data, an (N, D) tensor or array (arrays become ``dtype``).
    :param int batch_size: points per batch and rank (about); None: each rank's whole shard
        in every step (the exact full-batch objective).
    :param bool shuffle: draw a new order every epoch (seeded by ``seed``, the rank and the epoch).
    :param int seed: seed of the batch order.
    :param torch.dtype dtype: dtype for array input (default torch's default dtype).
    """

    def __init__(self, x, batch_size=None, shuffle=True, seed=0, dtype=None):
        super().__init__()
        is_array = not isinstance(x, torch.Tensor)
        x = check_data(x, "x", allow_numpy=True)
        if is_array:
            x = x.to(dtype or torch.get_default_dtype())
        self.x = x
        self.batch_size = None if batch_size is None else check_int(batch_size, "batch_size")
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be True or False, got {shuffle!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.shuffle, self.seed = shuffle, int(seed)
        self.rank, self.world_size = None, None
        self.shard_indices = None
        self.shard = None
        self._batches = None

    # ---------------------------------------------------------- constructors

    @classmethod
    def from_array(cls, x, **kwargs):
        """From an (N, D) tensor or array, or a .npy file (:func:`~pyro_esc.data.load_array`)."""
        if isinstance(x, (str, os.PathLike)):
            from ..data import load_array

            x = load_array(x, dtype=kwargs.get("dtype"))
        return cls(x, **kwargs)

    @classmethod
    def from_image_folder(cls, path, n, size=12, whitening="zca", epsilon=0.1, patch_seed=0, **kwargs):
        """Patches cut from a folder of images (:func:`~pyro_esc.data.load_image_folder`), DC removed, whitened.

        :param path: the folder. :param int n: number of patches. :param int size: patch side.
        :param whitening: ``"zca"``, ``"pca"`` or None (no whitening).
        :param float epsilon: the whitening's regulariser (see :class:`~pyro_esc.data.Whitening`).
        :param int patch_seed: seed of the patch positions. Other keywords go to the constructor.
        """
        from ..data import load_image_folder

        images = load_image_folder(path)
        return cls._from_images(images, n, size, whitening, epsilon, patch_seed, **kwargs)

    @classmethod
    def from_patches(cls, n, size=12, whitening="zca", epsilon=0.1, patch_seed=0, **kwargs):
        """The bundled natural-image patches pipeline (as ``pyro-esc patches``): DC removed, whitened."""
        return cls._from_images(None, n, size, whitening, epsilon, patch_seed, **kwargs)

    @classmethod
    def _from_images(cls, images, n, size, whitening, epsilon, patch_seed, **kwargs):
        from ..data import Whitening, image_patches

        if whitening not in ("zca", "pca", None):
            raise ValueError(f"whitening must be 'zca', 'pca' or None, got {whitening!r}")
        patches = image_patches(n, size=size, images=images, seed=patch_seed, dtype=torch.float64)
        data = patches if whitening is None else Whitening(whitening, epsilon=epsilon).fit_transform(patches)
        module = cls(data.to(kwargs.pop("dtype", None) or torch.get_default_dtype()), **kwargs)
        module.whitening = None if whitening is None else "fitted"
        return module

    # ---------------------------------------------------------- sharding

    @property
    def num_data(self):
        """N, the number of data points over all shards."""
        return self.x.size(0)

    def setup_shard(self, rank, world_size):
        """Fix this process's shard (called by :meth:`setup`; call it yourself without a Trainer).

        A shard once fixed stays: asking for another (rank, world size) is a ValueError,
        because per-point parameters were built for the rows of this one.
        """
        rank = check_int(rank, "rank", minimum=0)
        world_size = check_int(world_size, "world_size")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        if self.shard is not None:
            if (rank, world_size) != (self.rank, self.world_size):
                raise ValueError(f"this data module's shard is fixed for rank {self.rank} of {self.world_size}; "
                                 f"got rank {rank} of {world_size} (make a new data module and new per-point guides)")
            return
        ranges = shard_ranges(self.num_data, world_size)
        self.rank, self.world_size = rank, world_size
        self.shard_indices = torch.arange(ranges[rank].start, ranges[rank].stop)
        self.shard = self.x[ranges[rank].start:ranges[rank].stop]
        largest = max(len(r) for r in ranges)
        num_batches = 1 if self.batch_size is None else math.ceil(largest / self.batch_size)
        smallest = min(len(r) for r in ranges)
        if num_batches > smallest:
            raise ValueError(f"batch_size={self.batch_size} gives {num_batches} batches per epoch, more than the "
                             f"{smallest} points of the smallest shard; use a larger batch_size")
        self._batches = _ShardBatches(self.shard, num_batches, self.shuffle, self.seed + 7919 * rank)

    def setup(self, stage=None):
        trainer = self.trainer
        if trainer is not None:
            self.setup_shard(trainer.global_rank, trainer.world_size)
        else:
            self.setup_shard(*_world())

    def train_dataloader(self):
        if self._batches is None:
            self.setup()
        # batch_size=None: the dataset yields whole batches; the data are in memory, so no workers.
        return torch.utils.data.DataLoader(self._batches, batch_size=None)


# ------------------------------------------------------------------ the LightningModule


class SparseCodingModule(pl.LightningModule):
    r"""A LightningModule for a :class:`~pyro_esc.SparseCoding` model, a Gaussian guide and EntropyELBO.

    Each training step returns Pyro's loss -N L_H of the union of all ranks' batches (its
    annealed version with :class:`~pyro_esc.annealing.Annealing`), built from all-reduced
    statistics as the module docstring derives, so that loss and gradients equal the
    single-process EntropyELBO on the union. Logged: ``loss`` (-N L_H, unannealed) and
    ``elbo_running`` (-loss / N) per step, and the exact ``elbo`` per data point whenever
    the scales are written (start of training, every ``scales_every_n_epochs`` epochs).

    Parameters are created in :meth:`setup`, on the rank's shard, before Lightning builds
    the optimiser (Pyro creates guide parameters lazily, and an optimiser built before that
    would never see them). A per-point guide must therefore be passed unbuilt (never
    called), or built on this rank's shard.

    Use with :class:`SparseCodingDataModule`::

        loss_fn = EntropyELBO()(model, guide)              # Pyro's ELBOModule
        module = SparseCodingModule(loss_fn, lr=0.05)
        trainer = lightning.pytorch.Trainer(accelerator="gpu", devices=2, strategy="ddp", max_steps=2000)
        trainer.fit(module, datamodule=SparseCodingDataModule(x, batch_size=500))

    :param loss_fn: ``EntropyELBO(...)(model, guide)``, a :class:`pyro.infer.elbo.ELBOModule`
        whose model is a SparseCoding; its ``minibatch_statistics`` and ``annealing`` apply.
    :param float lr: learning rate of the default optimiser, ``torch.optim.Adam(betas=(0.9, 0.99))``.
    :param optimizer: optional ``optimizer(params) -> torch.optim.Optimizer`` instead of the default.
    :param scheduler: optional ``scheduler(optimizer) -> LRScheduler``, stepped after every step.
    :param sharded: whether the guide's parameters are per point (held by the rank that holds
        the points, excluded from DDP): None decides by type (Pyro autoguides such as
        ``AutoNormal`` and :class:`~pyro_esc.LocalMultivariateNormal`: yes; an encoder such
        as :class:`~pyro_esc.AmortizedNormal`: no).
    :param int scales_every_n_epochs: write lambda*, sigma^2* (an exact pass over the data) every
        this many epochs.
    :param int eval_batch_size: rows per chunk in that exact pass (bounds its memory).
    """

    def __init__(self, loss_fn, lr=0.05, optimizer=None, scheduler=None, sharded=None, scales_every_n_epochs=1,
                 eval_batch_size=4096):
        super().__init__()
        if not isinstance(loss_fn, ELBOModule) or not isinstance(loss_fn.elbo, EntropyELBO):
            raise ValueError(f"loss_fn must be EntropyELBO(...)(model, guide), Pyro's ELBOModule, "
                             f"got {type(loss_fn).__name__}")
        if not isinstance(loss_fn.model, SparseCoding):
            raise ValueError(f"loss_fn's model must be a pyro_esc.SparseCoding, got {type(loss_fn.model).__name__}")
        lr = float(lr)
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        for name, value in (("optimizer", optimizer), ("scheduler", scheduler)):
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be None or a callable, got {type(value).__name__}")
        if sharded is not None and not isinstance(sharded, bool):
            raise ValueError(f"sharded must be None, True or False, got {sharded!r}")
        self.loss_fn = loss_fn
        self.lr, self.optimizer_factory, self.scheduler_factory = lr, optimizer, scheduler
        self.sharded = isinstance(loss_fn.guide, AutoGuide) if sharded is None else sharded
        self.scales_every_n_epochs = check_int(scales_every_n_epochs, "scales_every_n_epochs")
        self.eval_batch_size = check_int(eval_batch_size, "eval_batch_size")
        self._shard = None
        self._num_data = None
        self._table = None
        self._joint = False

    def __getstate__(self):
        # The running table holds weak references (not picklable) and is rebuilt on demand;
        # ddp_spawn pickles the module into its worker processes.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_table"] = None
        return state

    @property
    def model(self):
        """The SparseCoding model."""
        return self.loss_fn.model

    @property
    def guide(self):
        """The guide."""
        return self.loss_fn.guide

    @property
    def elbo(self):
        """The EntropyELBO."""
        return self.loss_fn.elbo

    # ---------------------------------------------------------- setup

    def setup(self, stage=None):
        """Take the rank's shard from the data module and create every parameter on it (before the optimiser)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(datamodule, SparseCodingDataModule):
            raise ValueError("SparseCodingModule needs its data from a SparseCodingDataModule: "
                             "trainer.fit(module, datamodule=SparseCodingDataModule(x, ...))")
        self.attach_shard(datamodule)

    def attach_shard(self, datamodule):
        """Use ``datamodule``'s shard (fixed with ``setup_shard``) and create the parameters on it.

        :meth:`setup` calls it under a Trainer; call it yourself to use the module without one.
        """
        if datamodule.shard is None:
            datamodule.setup_shard(*_world())
        shard = datamodule.shard
        if self._shard is not None and self._shard.size(0) != shard.size(0):
            raise ValueError("this module was set up on another shard; build a new module (and per-point guide)")
        self._shard = shard
        self._num_data = datamodule.num_data
        world = datamodule.world_size
        # One evaluation on the shard: the model initialises from data and Pyro's lazy guide
        # parameters are created, in the data's dtype, before configure_optimizers sees them.
        with torch.no_grad():
            evaluation = read_posterior(self.model, self.guide, (shard,), {}, "SparseCodingModule")
        if evaluation.posterior.is_joint and world > 1:
            raise ValueError("the guide is one Gaussian over all points jointly; under DDP each rank would hold a "
                             "joint Gaussian over its shard only, another guide than on one process. Use a "
                             "per-point guide (LocalMultivariateNormal, AutoNormal) or AmortizedNormal")
        self._joint = evaluation.posterior.is_joint
        local = self._sharded_parameters()
        if self.sharded and world > 1:
            for name, param in self.guide.named_parameters():
                if param.dim() == 0 or param.size(0) != shard.size(0):
                    raise ValueError(f"sharded guide parameter {name} has shape {tuple(param.shape)}, not one row per "
                                     f"point of this rank's shard ({shard.size(0)}); pass sharded=False for a guide "
                                     f"with shared parameters, or an unbuilt per-point guide")
        # lambda and sigma^2 are set, never differentiated (every rank writes the same all-reduced
        # values); per-point parameters belong to their rank. DDP must neither broadcast nor reduce them.
        model = self.model
        ignored = {id(model.prior_scale_unconstrained), id(model.noise_var_unconstrained)} | {id(p) for p in local}
        self._ddp_params_and_buffers_to_ignore = [name for name, param in self.named_parameters()
                                                  if id(param) in ignored]

    def _sharded_parameters(self):
        return list(self.guide.parameters()) if self.sharded else []

    def configure_optimizers(self):
        params = [param for param in self.loss_fn.parameters() if param.requires_grad and
                  param is not self.model.prior_scale_unconstrained and param is not self.model.noise_var_unconstrained]
        optimizer = (torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.99)) if self.optimizer_factory is None
                     else self.optimizer_factory(params))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self):
        self._shard = self._shard.to(self.device)
        self._table = None
        world = self.trainer.world_size
        if world > 1:
            wrapped = self.trainer.strategy.model
            if not isinstance(wrapped, DistributedDataParallel):
                raise ValueError(f"with {world} processes SparseCodingModule needs a DDP strategy (strategy='ddp' or "
                                 f"'ddp_spawn'), got {type(self.trainer.strategy).__name__}")
            try:
                wrapped.register_comm_hook(None, sum_gradients_hook)
            except RuntimeError as error:
                raise ValueError("SparseCodingModule registers its own DDP communication hook (gradients summed "
                                 "over ranks, see sum_gradients_hook); do not pass ddp_comm_hook to the strategy"
                                 ) from error
        # Lightning allows no self.log here; the first logged "elbo" comes at the first epoch's end.
        self.update_scales(log=False)

    # ---------------------------------------------------------- the objective

    def objective(self, index):
        """The union's :class:`~pyro_esc.objectives.EntropyTerms` for the batch ``index`` of every rank.

        Differentiable in this rank's parameters (value: the union's; gradient: this rank's
        points' contribution). A collective call: every rank must call it.
        """
        shard = self._shard
        full = index.numel() == shard.size(0)
        subsample = None if full else index
        evaluation = read_posterior(self.model, self.guide, (shard,), {"subsample": subsample}, "SparseCodingModule")
        x, _, x_batch, posterior, dictionary = evaluation
        running = self.elbo.minibatch_statistics == "running"
        if full or not running:
            # One evaluation over the batch (also a joint guide's, whose entropy is not per point).
            stats = BatchStatistics.of(evaluation, self.model.prior)
            current = torch.cat([stats.entropy.reshape(1), stats.statistic_sum, stats.sq_error_sum.reshape(1)])
            others = torch.zeros_like(current)
            points = None
        else:
            check_distinct(subsample)
            points = PointStatistics.of(x_batch, posterior, dictionary, self.model.prior)
            current = torch.cat([points.entropy.sum(0, keepdim=True), points.statistic.sum(0),
                                 points.sq_error.sum(0, keepdim=True)])
            table = self._running_table(dictionary)
            # The stored rows of the points not in the batch (value only; no gradient).
            stored = torch.cat([table.entropy.sum(0, keepdim=True), table.statistic.sum(0),
                                table.sq_error.sum(0, keepdim=True)])
            in_batch = torch.cat([table.entropy[subsample].sum(0, keepdim=True), table.statistic[subsample].sum(0),
                                  table.sq_error[subsample].sum(0, keepdim=True)])
            others = stored - in_batch
        count = current.new_tensor([float(index.numel())])
        total = all_reduce_sum(torch.cat([others + current.detach(), count]))
        union_batch = int(round(float(total[-1])))
        num_data = self._num_data
        if running:
            # Value: the union's (stored rows outside the batches, current rows inside);
            # gradient: this rank's batch, times N / B_union as in Pyro's subsampling.
            gain = num_data / union_batch
            sums = total[:-1] + gain * (current - current.detach())
            num_points = num_data
        else:
            sums = current + (total[:-1] - current.detach())
            num_points = union_batch
        if points is not None:
            self._table.store(subsample, points)
        statistics = BatchStatistics(num_data, num_points, x.size(1), sums[0], sums[1:-1], sums[-1])
        return entropy_terms(statistics, self.model.prior)

    def _running_table(self, dictionary):
        if self._table is None:
            # One pass over the shard (no collectives: every rank does this at its first partial batch).
            rows = [self._chunk_points(chunk, dictionary) for chunk in self._chunks()]
            points = PointStatistics(*(torch.cat(parts) for parts in zip(*rows)))
            self._table = RunningStatistics(self.model, self.guide, self._shard, points)
        return self._table

    def _chunks(self):
        return torch.arange(self._shard.size(0), device=self._shard.device).split(self.eval_batch_size)

    @torch.no_grad()
    def _chunk_points(self, chunk, dictionary):
        subsample = None if chunk.numel() == self._shard.size(0) else chunk
        posterior = gaussian_posterior(self.guide, self._shard, subsample)
        return PointStatistics.of(self._shard.index_select(0, chunk), posterior, dictionary, self.model.prior)

    def training_step(self, batch, batch_idx):
        index, x_batch = batch
        if x_batch.size(0) != index.numel():
            raise ValueError(f"a batch must be (index, x_batch) with one row per index, got {index.numel()} "
                             f"indices and {x_batch.size(0)} rows")
        self.elbo.set_annealing_step(int(self.global_step))
        terms = self.objective(index)
        loss = -terms.num_data * terms.elbo
        terms.check_finite(loss)
        betas = self.elbo.betas
        optimised = loss if betas == (1.0, 1.0, 1.0) else -terms.num_data * terms.weighted_elbo(*betas)
        self.log("loss", loss.detach(), prog_bar=False, batch_size=index.numel())
        self.log("elbo_running", (-loss / terms.num_data).detach(), prog_bar=True, batch_size=index.numel())
        return optimised

    def on_train_epoch_end(self):
        if (self.current_epoch + 1) % self.scales_every_n_epochs == 0:
            self.update_scales()

    @torch.no_grad()
    def update_scales(self, log=True):
        """Write Theorem 2's lambda*, sigma^2* of all the data into the model; return the exact ELBO per point.

        An exact pass over the rank's shard in chunks, all-reduced: the sums S_H, S_phi,
        S_sq at the current parameters. Refreshes the running table, if any. A collective
        call: every rank must call it.
        """
        dictionary = self.model.read_dictionary()
        sums = None
        rows = []
        if self._joint:
            # A joint Gaussian (one process only): its entropy is known for all points together.
            stats = BatchStatistics.of(read_posterior(self.model, self.guide, (self._shard,), {}, "SparseCodingModule"),
                                       self.model.prior)
            sums = torch.cat([stats.entropy.reshape(1), stats.statistic_sum, stats.sq_error_sum.reshape(1)])
        for chunk in [] if self._joint else self._chunks():
            points = self._chunk_points(chunk, dictionary)
            if self._table is not None:
                rows.append(points)
            part = torch.cat([points.entropy.sum(0, keepdim=True), points.statistic.sum(0),
                              points.sq_error.sum(0, keepdim=True)])
            sums = part if sums is None else sums + part
        if self._table is not None:
            self._table.store(None, PointStatistics(*(torch.cat(parts) for parts in zip(*rows))))
        total = all_reduce_sum(sums)
        num_data = self._num_data
        statistics = BatchStatistics(num_data, num_data, self._shard.size(1), total[0], total[1:-1], total[-1])
        terms = entropy_terms(statistics, self.model.prior)
        terms.check_finite()
        self.model.assign_scales(terms.prior_scale, terms.noise_var)
        elbo = float(terms.elbo)
        if log and self._trainer is not None:
            self.log("elbo", elbo, prog_bar=True)
        return elbo
