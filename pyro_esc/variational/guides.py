"""Gaussian guides for :class:`~pyro_esc.SparseCoding` beyond Pyro's autoguides.

- :class:`LocalMultivariateNormal`: one full-covariance Gaussian per data point,
  q(z^(n)) = Normal(nu^(n), L^(n) L^(n)^T), created lazily from the model like
  Pyro's ``AutoNormal`` and subsampled through the model's ``"data"`` plate.
- :class:`AmortizedNormal`: an MLP encoder x -> (nu, covariance) with a diagonal,
  low-rank-plus-diagonal or full covariance head, configurable depth, width,
  residual blocks and activation, which also encodes data it has never seen.

Both are ordinary Pyro guides (``Trace_ELBO``, ``TraceMeanField_ELBO`` and
``Predictive`` run them) and both implement the guide protocol
``gaussian_posterior(x, subsample=None)`` of :mod:`pyro_esc.posterior`, so the
closed-form objectives read their parameters directly, without sampling.

Writing a new Gaussian guide: see :mod:`pyro_esc.posterior` and the README
section "Adding a Gaussian guide".
"""

import functools
import math
import numbers
from contextlib import ExitStack
from operator import attrgetter

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuide, AutoNormal
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam, pyro_method
from pyro.ops.tensor_utils import periodic_repeat

from .._checks import check_data_cached, check_int, check_positive, check_subsample
from .._pyro_internals import param_fullname
from .posterior import GaussianPosterior
from .rows import offers_row_access

__all__ = ["ACTIVATIONS", "AmortizedNormal", "LocalMultivariateNormal", "scale_tril_from_packed"]


def inverse_softplus(value):
    """softplus^-1(y) = log(expm1(y)) = y + log(-expm1(-y)), stable for small and large y > 0.

    Elementwise on a tensor (y <= 0, which softplus never gives, is clamped to the dtype's
    smallest positive number), or on a Python float.
    """
    if not isinstance(value, torch.Tensor):
        return float(inverse_softplus(torch.tensor(value, dtype=torch.float64)))
    value = value.clamp_min(torch.finfo(value.dtype).tiny)
    return value + torch.log(-torch.expm1(-value))


def _ridge_least_squares(design, response, ridge):
    """argmin_B ||design B - response||^2 + ridge * mean(diag(design^T design)) ||B||^2, by Cholesky."""
    normal = design.T @ design
    normal.diagonal().add_(ridge * normal.diagonal().mean())
    return torch.cholesky_solve(design.T @ response, torch.linalg.cholesky(normal))


def scale_tril_from_packed(diagonal, off_diagonal):
    """Assemble lower-triangular Cholesky factors from their packed entries.

        L_hh = diagonal_h,   L_ij = off_diagonal_k  for i > j, k running row by row
        (the order of ``torch.tril_indices(H, H, -1)``)

    :param torch.Tensor diagonal: the diagonals, shape (..., H) (positive for a valid factor).
    :param torch.Tensor off_diagonal: the strictly lower entries, shape (..., H (H - 1) / 2).
    :returns: L, shape (..., H, H).
    """
    n_latents = diagonal.size(-1)
    expected = tuple(diagonal.shape[:-1]) + (n_latents * (n_latents - 1) // 2,)
    if tuple(off_diagonal.shape) != expected:
        raise ValueError(f"off_diagonal must have shape {expected} "
                         f"for diagonal of shape {tuple(diagonal.shape)}, got {tuple(off_diagonal.shape)}")
    flat = _packed_positions(n_latents, diagonal.device)
    values = torch.cat([diagonal, off_diagonal], -1)
    batch = values.shape[:-1]
    tril = values.new_zeros(batch + (n_latents * n_latents,)).index_copy(-1, flat, values)
    return tril.reshape(batch + (n_latents, n_latents))


@functools.lru_cache(maxsize=None)
def _packed_positions(n_latents, device):
    # Flat positions in an H x H matrix: the diagonal first, then tril_indices(H, H, -1).
    rows, columns = torch.tril_indices(n_latents, n_latents, -1, device=device)
    return torch.cat([torch.arange(n_latents, device=device) * (n_latents + 1), rows * n_latents + columns])


def _is_real(support):
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class LocalMultivariateNormal(AutoGuide):
    r"""One full-covariance Gaussian per data point, created lazily from the model.

    For every latent site of the model (for :class:`~pyro_esc.SparseCoding`, the
    site ``"z"``) and every data point n::

        q(z^(n)) = Normal(nu^(n), T^(n)),   T^(n) = L^(n) L^(n)^T,
        L^(n) lower triangular with L_hh = softplus(r_hh) > 0

    Parameters per site: ``locs.<site>`` (N, H), ``scale_diags.<site>`` (N, H)
    and ``scale_offdiags.<site>`` (N, H (H - 1) / 2), the strictly lower entries
    of L packed row by row (see :func:`scale_tril_from_packed`): N H (H + 3) / 2
    numbers in all, never N^2. Unlike ``AutoMultivariateNormal`` (one Gaussian
    over all N H latents, (N H)^2 numbers), points are independent, so the guide
    scales to large N and supports minibatches.

    The diagonal is positive through softplus, as in Pyro's ``AutoNormal``
    (``softplus_positive``): for the small scales that posteriors reach,
    softplus is close to exp, so Adam's steps change L_hh by a relative amount
    and the entropy sum_h log L_hh is nearly linear in the parameter; for large
    values it is linear, so a large step cannot blow a scale up by a factor
    e^step as exp would. The diagonal is a separate parameter so that the
    constraint applies to it alone.

    All parameters carry ``event_dim=1``, so inside the ``"data"`` plate
    Pyro slices them to the minibatch. By default the guide takes its plates
    from ``model.create_plates`` (when the model has it, as SparseCoding
    does), so ``guide(x, subsample=idx)`` and ``subsample_size`` follow the
    model. Initialisation: nu from ``init_loc_fn`` (zeros by default, the
    prior's centre), L = ``init_scale`` * I.

    The latent sites must be real-valued vectors (event shape (H,)) in one
    plate at dim -1. :meth:`gaussian_posterior` (the protocol of
    :mod:`pyro_esc.posterior`) reads the parameters directly, so
    :class:`~pyro_esc.EntropyELBO` never samples.

    Example::

        >>> import pyro, torch
        >>> from pyro_esc import LocalMultivariateNormal, SparseCoding
        >>> pyro.clear_param_store()
        >>> x = torch.randn(5, 4)
        >>> model = SparseCoding(4, 3)
        >>> guide = LocalMultivariateNormal(model)
        >>> tuple(guide(x)["z"].shape)                  # one full-covariance Gaussian per point: a draw of z
        (5, 3)

    :param callable model: the Pyro model (e.g. a :class:`~pyro_esc.SparseCoding`).
    :param callable init_loc_fn: per-site initialisation of the means
        (see Pyro's ``autoguide.initialization``); default ``init_to_feasible`` (zeros).
    :param float init_scale: initial L = init_scale * I; default 0.1.
    :param callable create_plates: plates for ``guide(*args, **kwargs)`` as for
        any autoguide; default ``model.create_plates`` if the model has one.
    """

    def __init__(self, model, *, init_loc_fn=init_to_feasible, init_scale=0.1, create_plates=None):
        self.init_loc_fn = init_loc_fn
        self._init_scale = check_positive(init_scale, "init_scale")
        if create_plates is None:
            create_plates = getattr(model, "create_plates", None)
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.locs = PyroModule()
        self.scale_diags = PyroModule()
        self.scale_offdiags = PyroModule()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            value = site["value"].detach()
            frames = [frame for frame in site["cond_indep_stack"] if frame.vectorized]
            if (not _is_real(site["fn"].support) or site["fn"].event_dim != 1 or value.dim() != 2
                    or len(frames) != 1 or frames[0].dim != -1):
                raise ValueError(
                    f"LocalMultivariateNormal needs every latent site to be a real vector (event shape (H,)) "
                    f"in one plate at dim -1; site {name!r} has support {site['fn'].support}, value shape "
                    f"{tuple(value.shape)} and plates {[frame.name for frame in frames]}")
            frame = frames[0]
            full_size = frame.full_size or frame.size
            loc = value.clone()
            if full_size != frame.size:
                # The prototype ran on a minibatch: repeat it to all points, as AutoNormal does.
                loc = periodic_repeat(loc, full_size, 0).contiguous()
            n_latents = loc.size(-1)
            diagonal = torch.full_like(loc, self._init_scale)
            off_diagonal = loc.new_zeros(full_size, n_latents * (n_latents - 1) // 2)
            deep_setattr(self.locs, name, PyroParam(loc, constraints.real, event_dim=1))
            deep_setattr(self.scale_diags, name, PyroParam(diagonal, constraints.softplus_positive, event_dim=1))
            deep_setattr(self.scale_offdiags, name, PyroParam(off_diagonal, constraints.real, event_dim=1))

    def _site_params(self, name):
        # Read inside a plate, these are the minibatch's rows (event_dim=1).
        loc = attrgetter(name)(self.locs)
        diagonal = attrgetter(name)(self.scale_diags)
        off_diagonal = attrgetter(name)(self.scale_offdiags)
        return loc, diagonal, off_diagonal

    def forward(self, *args, **kwargs):
        """Sample every latent site from its per-point MultivariateNormal.

        Takes the model's arguments; returns a dict from site name to sample.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                loc, diagonal, off_diagonal = self._site_params(name)
                scale_tril = scale_tril_from_packed(diagonal, off_diagonal)
                result[name] = pyro.sample(name, dist.MultivariateNormal(loc, scale_tril=scale_tril))
        return result

    @pyro_method
    def gaussian_posterior(self, x, subsample=None):
        """The protocol of :mod:`pyro_esc.posterior`: q(z | x) for the points x[subsample].

        Reads the parameters of site ``"z"`` without sampling; with ``subsample``
        only the batch's rows are unpacked.

        :param torch.Tensor x: all N data points, as passed to the model.
        :param torch.Tensor subsample: optional indices of the minibatch.
        :rtype: ~pyro_esc.GaussianPosterior
        """
        x = check_data_cached(x, "x")
        subsample = check_subsample(subsample, x.size(0))
        if self.prototype_trace is None:
            self._setup_prototype(x, **({} if subsample is None else {"subsample": subsample}))
        if "z" not in self.prototype_trace.nodes:
            raise ValueError("LocalMultivariateNormal was built for a model without a latent site 'z'")
        rows = self._site_params("z")
        if rows[0].size(0) != x.size(0):
            raise ValueError(f"LocalMultivariateNormal holds parameters for {rows[0].size(0)} data points, "
                             f"but x has {x.size(0)}; build a new guide for this data")
        if subsample is not None:
            rows = [value.index_select(0, subsample) for value in rows]
        return self.posterior_from_rows(rows)

    def posterior_from_rows(self, rows):
        """The batch's posterior from its rows of :meth:`per_point_parameters` (constrained, in that order):
        what the row-wise route hands over instead of the param store's (see :mod:`pyro_esc.rows`)."""
        loc, diagonal, off_diagonal = rows
        return GaussianPosterior.from_scale_tril(loc, scale_tril_from_packed(diagonal, off_diagonal))

    def per_point_parameters(self):
        """Param-store names of the per-point parameters of site ``"z"`` (see :mod:`pyro_esc.rows`).

        In the order (means, diagonals of L, packed off-diagonals of L); None before the guide has run.
        """
        if self.prototype_trace is None or "z" not in self.prototype_trace.nodes:
            return None
        return [param_fullname(module, "z") for module in (self.locs, self.scale_diags, self.scale_offdiags)]

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """The posterior median (= mean) of every latent site, shape (N, H), as a dict.

        Takes the model's arguments (used only to set the guide up if it has never run).
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {name: self._read_loc(name).detach().clone() for name, _ in self.prototype_trace.iter_stochastic_nodes()}

    @pyro_method
    def _read_loc(self, name):
        return attrgetter(name)(self.locs)


#: Activations of :class:`AmortizedNormal` by name (an ``nn.Module`` class, built without arguments).
ACTIVATIONS = {
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
#: Covariance heads of :class:`AmortizedNormal`.
COVARIANCES = ("diag", "lowrank", "full")
#: The low-rank head's default rank (capped at H), as in the authors' encoders.
DEFAULT_RANK = 5
#: The low-rank head's default floor on the diagonal scales s (the authors add 1e-3 too): without
#: one, a line search can drive s to 0 and the determinant lemma's R x R capacitance overflows.
DEFAULT_LOWRANK_MIN_SCALE = 1e-3


def _check_activation(activation):
    # Returns (name or None, module class).
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or an nn.Module class, "
                             f"got {activation!r}")
        return activation, ACTIVATIONS[activation]
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        names = [name for name, cls in ACTIVATIONS.items() if cls is activation]
        return (names[0] if names else None), activation
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or an nn.Module class, got {activation!r}")


class _ResidualBlock(PyroModule):
    """h -> h + B act(A h + a) + b: one residual block of the encoder's trunk."""

    def __init__(self, width, inner, activation):
        super().__init__()
        # PyroModule layers, so that their parameters enter Pyro's param store (and SVI trains them).
        self.inner = PyroModule[nn.Linear](width, inner)
        self.outer = PyroModule[nn.Linear](inner, width)
        self.activation = activation()

    def forward(self, features):
        return features + self.outer(self.activation(self.inner(features)))

    def reset_parameters(self):
        self.inner.reset_parameters()
        self.outer.reset_parameters()


class AmortizedNormal(PyroModule):
    r"""An amortised Gaussian guide: an MLP encoder x -> q(z | x).

    For a data point x (shape (D,))::

        h   = trunk(x)                (Linear + activation layers of sizes ``hidden``, then
                                       ``blocks`` residual blocks h <- h + B act(A h + a) + b
                                       of inner width ``block_width``)
        nu  = M h + K_nu x + m        (mean, shape (H,))
        diag:     q(z | x) = Normal(nu, diag(s)^2),             s = softplus(S h + K_s x + c) + min_scale
        lowrank:  q(z | x) = Normal(nu, F F^T + diag(s)^2),     F = (R h + K_F x + r) as (H, rank)
        full:     q(z | x) = Normal(nu, L L^T),  L_hh = s_h, L_ij (i > j) from
                  C h + K_L x + c' packed row by row (H (H - 1) / 2 outputs)

    The K terms are an optional linear **skip connection** from x to every head
    (``skip=True``; without it K = 0): a posterior mean that is linear in x, as far from zero
    the sparse-coding posterior nearly is and the probabilistic-PCA posterior exactly is,
    needs no hidden unit, and the hidden layer only has the nonlinear remainder to learn. It
    also makes every head linear in (M, K, m) at fixed features, which
    :meth:`match_posteriors` uses to set them by least squares: :func:`~pyro_esc.fit_amortized`
    wants it (without it the least-squares start is poor; BENCHMARKS.md, "Amortised
    inference"). It is off by default because it has not been measured on the other training
    paths (and on one, encoder and model trained together from scratch by SVI on 204,800
    whitened 16x16 patches, a scale of the encoder underflowed to 0).

    The default activation is ELU: smooth and without dead units, so every unit
    learns from the start. The authors' encoders (Velychko et al. 2024) are, in
    these terms, ``hidden=(10 D, 10 D), activation="relu6", covariance="lowrank",
    rank=5`` (they use separate networks per head; here the heads share the trunk)
    and ``hidden=(2 D,), blocks=2, block_width=3 D`` (residual).

    Initialisation, so that training starts from the same useful posteriors
    as the local guides (nu = 0, L = ``init_scale`` * I) for every input: the
    output layers start with weights ``out_init`` times their default and
    biases 0, except the scales' bias, softplus^-1(init_scale), and the skip
    connection at 0; the low-rank
    factor F then starts small (entries of order ``out_init``), but not exactly
    0, which would be a stationary point of the ELBO in F. Residual blocks start
    with their second layer scaled by ``out_init`` too, so at the start a block is
    nearly the identity. The other hidden layers keep PyTorch's default initialisation.

    It has the model's call signature, ``guide(x, subsample=None,
    subsample_size=None)``, with x all N points, and encodes only x[subsample]
    inside a plate ``"data"`` (dim -1), so minibatches work as for the model.
    :meth:`encode` encodes any x (e.g. held-out data); :meth:`gaussian_posterior`
    is the protocol of :mod:`pyro_esc.posterior` (no sampling), for the low-rank
    head a :class:`~pyro_esc.posterior.LowRankGaussianPosterior` (entropy by the
    matrix determinant lemma, an R x R Cholesky factor per point).

    Parameters follow the data's dtype and device: on the first call the
    module is moved to x's (its parameters keep their identity).

    **Units.** The network reads ``x / unit`` and its outputs (nu, s, L or F) are
    multiplied by ``unit``, a buffer that is 1 at construction. So the encoder's
    parameters live in a fixed range whatever the data's units: :func:`~pyro_esc.fit`
    trains it on data brought by a power of two near a standard scale
    (:mod:`pyro_esc.standard_units`) and sets ``unit`` to that power when it hands the
    encoder back; :meth:`rescale` expresses a trained encoder for data times c exactly
    (the model is scale-equivariant: data times c have the posteriors of c z).

    :param int data_dim: D.
    :param int n_latents: H.
    :param tuple hidden: sizes of the hidden layers; default (100,). Empty: a linear encoder
        (or, with ``blocks``, residual blocks of width D). With many latents make the layer
        wider than H: on whitened patches with H = 144 the default learns a far worse
        dictionary than one layer of 500 (BENCHMARKS.md, "Which encoder for the patches").
    :param str covariance: ``"diag"`` (default), ``"lowrank"`` or ``"full"``.
    :param float init_scale: initial posterior standard deviation; default 0.1.
    :param float out_init: factor on the output layers' initial weights; default 0.01.
    :param activation: the hidden layers' nonlinearity: a name of :data:`ACTIVATIONS`
        (default ``"elu"``) or an ``nn.Module`` class built without arguments (and without parameters).
    :param int blocks: residual blocks after the hidden layers; default 0.
    :param int block_width: inner width of the residual blocks; default 3/2 of their width
        (the last hidden size, or D), as the authors' 2 D -> 3 D -> 2 D blocks.
    :param int rank: rank R of the low-rank head (``covariance="lowrank"`` only); default min(5, H).
    :param float min_scale: a floor added to the scales, s = softplus(.) + min_scale; default
        :data:`DEFAULT_LOWRANK_MIN_SCALE` for ``"lowrank"``, else 0.
    :param bool skip: the linear skip connection from x to the heads (default False).

    Example::

        >>> import torch
        >>> from pyro_esc import AmortizedNormal
        >>> encoder = AmortizedNormal(data_dim=4, n_latents=3, hidden=(8,), covariance="full", skip=True)
        >>> loc, scale_tril = encoder.encode(torch.randn(5, 4))
        >>> loc.shape, scale_tril.shape
        (torch.Size([5, 3]), torch.Size([5, 3, 3]))
    """

    def __init__(self, data_dim, n_latents, hidden=(100,), covariance="diag", init_scale=0.1, out_init=0.01, *,
                 activation="elu", blocks=0, block_width=None, rank=None, min_scale=None, skip=False):
        super().__init__(name=type(self).__name__)
        self.data_dim = check_int(data_dim, "data_dim")
        self.n_latents = check_int(n_latents, "n_latents")
        if isinstance(hidden, (int, str)) or not all(isinstance(size, int) for size in hidden):
            raise ValueError(f"hidden must be a tuple of layer sizes (integers >= 1), got {hidden!r}")
        self.hidden = tuple(check_int(size, "hidden") for size in hidden)
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.covariance = covariance
        if covariance == "lowrank":
            self.rank = min(DEFAULT_RANK, self.n_latents) if rank is None else check_int(rank, "rank")
        elif rank is not None:
            raise ValueError(f"rank applies to covariance='lowrank', not {covariance!r}")
        else:
            self.rank = None
        self.activation_name, self._activation = _check_activation(activation)
        self.blocks = check_int(blocks, "blocks", minimum=0)
        width = self.hidden[-1] if self.hidden else self.data_dim
        self.block_width = (max(1, round(1.5 * width)) if block_width is None
                            else check_int(block_width, "block_width"))
        if block_width is not None and not self.blocks:
            raise ValueError("block_width applies to residual blocks (blocks >= 1)")
        init_scale = check_positive(init_scale, "init_scale")
        if min_scale is None:
            min_scale = DEFAULT_LOWRANK_MIN_SCALE if covariance == "lowrank" else 0.0
        if isinstance(min_scale, bool) or not isinstance(min_scale, numbers.Real) or not 0 <= min_scale < init_scale:
            raise ValueError(f"min_scale must be a number >= 0 and below init_scale = {init_scale:g}, "
                             f"got {min_scale!r}")
        self.min_scale = float(min_scale)
        out_init = float(out_init)
        if not out_init >= 0:
            raise ValueError(f"out_init must be >= 0, got {out_init!r}")

        sizes = (self.data_dim,) + self.hidden
        self.layers = PyroModule[nn.ModuleList](
            [PyroModule[nn.Linear](a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        self.residual_blocks = PyroModule[nn.ModuleList](
            [_ResidualBlock(width, self.block_width, self._activation) for _ in range(self.blocks)])
        self.nonlinearity = self._activation()
        self.loc_layer = PyroModule[nn.Linear](width, self.n_latents)
        self.scale_layer = PyroModule[nn.Linear](width, self.n_latents)
        if covariance == "full":
            num_off = self.n_latents * (self.n_latents - 1) // 2
        elif covariance == "lowrank":
            num_off = self.n_latents * self.rank
        else:
            num_off = 0
        # "off_diagonal_layer" holds L's strictly lower entries (full) or the factor F (lowrank).
        self.off_diagonal_layer = PyroModule[nn.Linear](width, num_off) if num_off else None
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be True or False, got {skip!r}")
        # One linear map x -> every head's output, split as the heads are (no bias: theirs serve).
        self.skip_layer = (PyroModule[nn.Linear](self.data_dim, sum(self._head_sizes()), bias=False)
                           if skip else None)
        self._init_scale, self._out_init = init_scale, out_init
        self._initialize_outputs()
        # A buffer, so a checkpoint remembers that the parameters were matched to data.
        self.register_buffer("matched", torch.tensor(False))
        # The data's unit (see "Units"): a buffer, so files and checkpoints keep it.
        self.register_buffer("unit", torch.tensor(1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files and checkpoints written before the unit existed: their encoders read the data as they were.
        state_dict.setdefault(prefix + "unit", torch.ones((), dtype=self.unit.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def rescale(self, factor):
        """Express the encoder for data times ``factor``: afterwards ``encode(factor * x)`` gives the
        posterior of ``factor * z`` where ``encode(x)`` gave that of z (``unit`` times ``factor``; the
        network is unchanged). Exact for powers of two, as :func:`~pyro_esc.fit` uses it."""
        factor = float(factor)
        if not 0 < factor < math.inf:
            raise ValueError(f"factor must be a positive finite number, got {factor!r}")
        self.unit.mul_(factor)

    @torch.no_grad()
    def _initialize_outputs(self):
        for layer in (self.loc_layer, self.scale_layer, self.off_diagonal_layer):
            if layer is not None:
                layer.weight.mul_(self._out_init)
                layer.bias.zero_()
        self.scale_layer.bias.fill_(inverse_softplus(self._init_scale - self.min_scale))
        if self.skip_layer is not None:
            self.skip_layer.weight.zero_()
        for block in self.residual_blocks:
            block.outer.weight.mul_(self._out_init)
            block.outer.bias.zero_()

    @torch.no_grad()
    def reset_parameters(self):
        """Draw a fresh initialisation in place (torch's RNG), as at construction.

        The parameters keep their identity, so the param store stays attached;
        :func:`~pyro_esc.fit` calls it for each restart (``n_init``).
        """
        for layer in list(self.layers) + list(self.residual_blocks) + [self.loc_layer, self.scale_layer,
                                                                        self.off_diagonal_layer]:
            if layer is not None:
                layer.reset_parameters()
        self._initialize_outputs()

    @property
    def skip(self):
        """Whether the heads have the linear skip connection from x."""
        return self.skip_layer is not None

    def _heads(self):
        """The output layers: mean, scales, and the off-diagonal entries or low-rank factor (None if absent)."""
        return self.loc_layer, self.scale_layer, self.off_diagonal_layer

    def _head_sizes(self):
        return tuple(0 if layer is None else layer.out_features for layer in self._heads())

    def features(self, x):
        """h = trunk(x / unit): the hidden layers' and residual blocks' output, (B, width) (the heads' input)."""
        return self._trunk(x / self.unit)

    def _trunk(self, x):
        # x in the encoder's own units (divided by unit).
        features = x
        for layer in self.layers:
            features = self.nonlinearity(layer(features))
        for block in self.residual_blocks:
            features = block(features)
        return features

    def _raw_outputs(self, x):
        """The heads' outputs before their transforms: mean, pre-softplus scales, off-diagonal/factor (or None),
        for x in the encoder's own units (divided by ``unit``)."""
        features = self._trunk(x)
        outputs = [None if layer is None else layer(features) for layer in self._heads()]
        if self.skip_layer is not None:
            skips = self.skip_layer(x).split(self._head_sizes(), dim=-1)
            outputs = [None if output is None else output + skip for output, skip in zip(outputs, skips)]
        return outputs

    @torch.no_grad()
    def match_posteriors(self, x, posterior, ridge=1e-6):
        r"""Set the heads by least squares so that the encoder reproduces given posteriors of ``x``.

        At fixed features h = trunk(x) every head's output before its transform is linear in
        the head's weights, y(x) = M h + K x + m (K: the skip connection; without one, y = M h + m).
        Given target posteriors of the points, their heads' outputs are known: the means; the
        scales through softplus^-1 (the marginal standard deviations for ``"diag"`` and
        ``"lowrank"``, the Cholesky factor's diagonal for ``"full"``); and L's strictly lower
        entries for ``"full"``. The weights that reproduce those targets best in the mean
        square are one linear solve, ridge-regularised by ``ridge`` times the mean diagonal of
        the normal equations. The trunk is not changed, nor the low-rank factor's head
        (a low-rank factor is not a linear function of the targets). All of this happens in
        the encoder's own units: x and the posteriors divided by ``unit``.

        :func:`~pyro_esc.fit_amortized` starts its encoder this way from posteriors solved
        at the learned model (:func:`~pyro_esc.solve_posteriors`), so that training starts near
        the per-point optimum instead of at nu = 0 for every point.

        :param torch.Tensor x: the points, (B, D), with B at least the number of weights per head
            output (the width, plus D with the skip connection, plus 1).
        :param ~pyro_esc.GaussianPosterior posterior: the target posteriors of the B points.
        :param float ridge: the relative ridge.
        :returns: the mean squared error of the fitted outputs, one float per head
            (``(mean, scale, off_diagonal)``; None for a head not fitted).
        """
        x = check_data_cached(x, "x", self.data_dim)
        self._match(x)
        if not isinstance(posterior, GaussianPosterior) or posterior.is_joint or tuple(posterior.mean.shape) != (
                x.size(0), self.n_latents):
            raise ValueError(f"posterior must be a per-point GaussianPosterior of {x.size(0)} points and "
                             f"{self.n_latents} latents, got {posterior!r}")
        ridge = float(ridge)
        if not ridge >= 0:
            raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
        targets = self._raw_targets(posterior)
        fitted = [index for index, target in enumerate(targets) if target is not None]
        work = dict(dtype=torch.float64, device=x.device)
        x = x / self.unit
        # The heads' common inputs: [h, x, 1] (x only with the skip connection).
        inputs = [self._trunk(x).to(**work)] + ([x.to(**work)] if self.skip else [])
        design = torch.cat(inputs + [torch.ones(x.size(0), 1, **work)], dim=1)
        if x.size(0) < design.size(1):
            raise ValueError(f"x must have at least {design.size(1)} points to set {design.size(1)} weights per "
                             f"output by least squares, got {x.size(0)}")
        response = torch.cat([targets[index].to(**work) for index in fitted], dim=1)
        weights = _ridge_least_squares(design, response, ridge)
        errors = (design @ weights - response).square()
        sizes = self._head_sizes()
        blocks = dict(zip(fitted, weights.split([sizes[index] for index in fitted], dim=1)))
        self._set_heads(blocks, width=inputs[0].size(1))
        if not bool(self.matched):
            self.matched.fill_(True)
        error_blocks = dict(zip(fitted, errors.split([sizes[index] for index in fitted], dim=1)))
        return tuple(float(error_blocks[index].mean()) if index in error_blocks else None for index in range(3))

    def _raw_targets(self, posterior):
        """The heads' outputs before their transforms that would give ``posterior``: [mean, scales, lower or None],
        in the encoder's own units (divided by ``unit``)."""
        unit = self.unit.to(posterior.mean.dtype)
        if self.covariance == "full":
            scale_tril = torch.linalg.cholesky(posterior.covariance_matrices()) / unit
            scales = scale_tril.diagonal(dim1=-2, dim2=-1)
            rows, columns = torch.tril_indices(self.n_latents, self.n_latents, -1, device=scale_tril.device)
            lower = scale_tril[:, rows, columns] if self.off_diagonal_layer is not None else None
        else:  # the marginal scales; a low-rank factor is not a linear function of the targets
            scales, lower = posterior.stddev / unit, None
        raw_scales = inverse_softplus((scales - self.min_scale).clamp_min(torch.finfo(scales.dtype).eps))
        return [posterior.mean / unit, raw_scales, lower]

    def _set_heads(self, blocks, width):
        """Write least-squares weights into the heads: ``blocks[i]`` is head i's (inputs, outputs) block,
        rows ordered as the design [h (``width`` rows), x (with the skip connection), 1]."""
        heads, sizes = self._heads(), self._head_sizes()
        skip_rows = torch.cumsum(torch.tensor((0,) + sizes), 0).tolist()  # each head's rows of the skip layer
        for index, block in blocks.items():
            head = heads[index]
            block = block.to(head.weight)
            head.weight.copy_(block[:width].T)
            head.bias.copy_(block[-1])
            if self.skip:
                rows = slice(skip_rows[index], skip_rows[index + 1])
                self.skip_layer.weight[rows].copy_(block[width:width + self.data_dim].T)

    def config(self):
        """The constructor's arguments as plain values: ``AmortizedNormal(**guide.config())`` rebuilds it.

        :raises ValueError: if the activation is a class not named in :data:`ACTIVATIONS`.
        """
        if self.activation_name is None:
            raise ValueError(f"the activation {self._activation.__name__} has no name in "
                             f"pyro_esc.guides.ACTIVATIONS: only named activations can be stored as plain values")
        config = {"data_dim": self.data_dim, "n_latents": self.n_latents, "hidden": list(self.hidden),
                  "covariance": self.covariance, "init_scale": self._init_scale, "out_init": self._out_init,
                  "activation": self.activation_name, "blocks": self.blocks, "min_scale": self.min_scale,
                  "skip": self.skip}
        if self.blocks:
            config["block_width"] = self.block_width
        if self.rank is not None:
            config["rank"] = self.rank
        return config

    def extra_repr(self):
        text = f"data_dim={self.data_dim}, n_latents={self.n_latents}, hidden={self.hidden}, " \
               f"covariance={self.covariance!r}"
        if self.rank is not None:
            text += f", rank={self.rank}"
        if self.blocks:
            text += f", blocks={self.blocks}, block_width={self.block_width}"
        if self.skip:
            text += ", skip=True"
        return text + f", activation={self.activation_name or self._activation.__name__!r}"

    def _match(self, x):
        # Follow the first data's dtype and device (nn.Module.to keeps parameter identity);
        # later a mismatch is the user's error, as for the model.
        weight = self.loc_layer._parameters["weight"]
        if weight.dtype == x.dtype and weight.device == x.device:
            return
        if bool(self.matched):
            raise ValueError(f"x has dtype {x.dtype} on {x.device}, but the guide's parameters are "
                             f"{weight.dtype} on {weight.device}; convert x or the guide (guide.to(...))")
        self.to(dtype=x.dtype, device=x.device)

    @pyro_method
    def encode(self, x):
        """Encode data points: the posterior means and covariance parameters for each row of x.

        :param torch.Tensor x: data, shape (B, D) (any points, seen in training or not).
        :returns: ``(loc, scale)``: loc (B, H); scale (B, H) standard deviations for
            ``covariance="diag"``, (B, H, H) Cholesky factors for ``"full"``, or for
            ``"lowrank"`` the pair ``(cov_factor, cov_diag)``, F (B, H, R) and the
            variances diag(s)^2 (B, H), as ``LowRankMultivariateNormal`` takes them.
        """
        x = check_data_cached(x, "x", self.data_dim)
        self._match(x)
        if not bool(self.matched):
            self.matched.fill_(True)
        unit = self.unit
        scaled = bool(unit != 1)  # (a unit of 1 skips the products: the same numbers, less work)
        return self.encoding(*self._raw_outputs(x / unit if scaled else x), floor=self.min_scale,
                             unit=unit if scaled else None)

    # ------------------------------------------------------------ the covariance family: the one switch
    #
    # How each family lays out its parameters lives in these three methods; encode, forward,
    # gaussian_posterior and SemiAmortized's refinement ask them.

    def encoding(self, loc, raw_scales, extra, floor=0.0, unit=None):
        """:meth:`encode`'s ``(loc, scale)`` from unconstrained parts: the means, the scales before
        ``softplus(.) + floor``, and the extra head (L's packed strictly lower entries, ``"full"``; F
        flattened or not, ``"lowrank"``; None for ``"diag"``), all multiplied by ``unit`` if given."""
        diagonal = nn.functional.softplus(raw_scales)
        if floor:
            diagonal = diagonal + floor
        if unit is not None:
            loc, diagonal = loc * unit, diagonal * unit
            extra = None if extra is None else extra * unit
        if self.covariance == "diag":
            return loc, diagonal
        if self.covariance == "lowrank":
            factor = extra.reshape(extra.shape[:loc.dim() - 1] + (self.n_latents, self.rank))
            return loc, (factor, diagonal.square())
        # With H = 1 there is no off-diagonal entry (and no layer for it).
        extra = diagonal[..., :0] if extra is None else extra
        return loc, scale_tril_from_packed(diagonal, extra)

    def unconstrained(self, loc, scale, floor=0.0):
        """The inverse of :meth:`encoding` (without ``unit``): ``[loc, softplus^-1(s - floor), extra]``, extra
        L's packed strictly lower entries (``"full"``) or F (``"lowrank"``), none for ``"diag"``."""
        if self.covariance == "diag":
            return [loc, inverse_softplus(scale - floor)]
        if self.covariance == "lowrank":
            factor, cov_diag = scale
            return [loc, inverse_softplus(cov_diag.sqrt() - floor), factor]
        rows, columns = torch.tril_indices(loc.size(-1), loc.size(-1), -1, device=loc.device)
        return [loc, inverse_softplus(scale.diagonal(dim1=-2, dim2=-1) - floor), scale[..., rows, columns]]

    def posterior_from_encoding(self, loc, scale):
        """The :class:`~pyro_esc.GaussianPosterior` of :meth:`encode`'s ``(loc, scale)``."""
        if self.covariance == "diag":
            return GaussianPosterior.from_scale(loc, scale)
        if self.covariance == "lowrank":
            return GaussianPosterior.from_low_rank(loc, *scale)
        return GaussianPosterior.from_scale_tril(loc, scale)

    def forward(self, x, subsample=None, subsample_size=None):
        """Sample z ~ q(z | x^(n)) for the points of the ``"data"`` plate (the model's arguments).

        :returns: z, shape (B, H).
        """
        x = check_data_cached(x, "x", self.data_dim)
        subsample = check_subsample(subsample, x.size(0))
        with pyro.plate("data", x.size(0), subsample=subsample, subsample_size=subsample_size, dim=-1) as index:
            # As in the model: a full-size index is no subsample (Pyro slices nothing then).
            x_batch = x if index.size(0) == x.size(0) else x.index_select(0, index)
            posterior = self.posterior_from_encoding(*self.encode(x_batch))
            return pyro.sample("z", posterior.per_point_distribution())

    @pyro_method
    def gaussian_posterior(self, x, subsample=None):
        """The protocol of :mod:`pyro_esc.posterior`: q(z | x) for the points x[subsample].

        :param torch.Tensor x: all N data points, as passed to the model.
        :param torch.Tensor subsample: optional indices of the minibatch.
        :rtype: ~pyro_esc.GaussianPosterior
        """
        x = check_data_cached(x, "x", self.data_dim)
        subsample = check_subsample(subsample, x.size(0))
        return self.posterior_from_encoding(*self.encode(x if subsample is None else x.index_select(0, subsample)))


def covariance_family(guide):
    """``"diag"`` for ``AutoNormal``, ``"full"`` for :class:`~pyro_esc.LocalMultivariateNormal`, else None.

    The one switch on a guide's covariance family: the EM route, the per-point solver (encode), the
    standard units of fit and the estimator ask it. These two families have one Gaussian per point.
    """
    if isinstance(guide, LocalMultivariateNormal):
        return "full"
    if type(guide) is AutoNormal and offers_row_access(guide):
        return "diag"
    return None
