"""The guide protocol: what a guide must tell the closed-form objectives.

The closed-form objectives never sample. From a guide they need, for the B data
points of the current batch, a Gaussian summary of q(z | x^(n)):

- the means nu^(n) (B, H) and marginal variances tau^2 (B, H), for E|z_h|;
- the total entropy sum_n H[q^(n)] (or the joint entropy of a guide that is
  one Gaussian over all points);
- the covariances T^(n), only through the trace term sum_n tr(W T^(n) W^T).

:class:`GaussianPosterior` holds exactly that, and :func:`gaussian_posterior`
is the one protocol that produces it from ``(guide, x, subsample)``. It finds
the summary in this order:

1. a function registered for the guide's class with
   ``@gaussian_posterior.register(GuideClass)`` (Pyro's autoguides are
   registered here and read their parameters directly, without sampling);
2. a method ``guide.gaussian_posterior(x, subsample=None)``;
3. automatic recognition: the guide is run once under a trace and its ``"z"``
   site (or the single auxiliary site that ``"z"`` copies) must be a
   Normal, MultivariateNormal or LowRankMultivariateNormal.

A guide that is none of these gets a ValueError that says how to add it.
"""

import functools

import torch

import torch.distributions as tdist
from pyro import poutine
from pyro.distributions import Delta, LowRankMultivariateNormal, MultivariateNormal, Normal
from pyro.infer.autoguide import AutoContinuous, AutoDelta, AutoNormal
from pyro.nn import pyro_method

from .gaussian import (
    entropy_from_low_rank,
    entropy_from_scale,
    entropy_from_scale_tril,
    trace_of_product,
)

SUPPORTED_GUIDES = (
    "AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal, "
    "LocalMultivariateNormal, AmortizedNormal, and any guide whose \"z\" site (or the single "
    "auxiliary site that \"z\" copies) is a Normal, MultivariateNormal or LowRankMultivariateNormal"
)
HOW_TO_ADD = (
    "To add a Gaussian guide, give it a method gaussian_posterior(x, subsample=None) returning "
    "pyro_esc.GaussianPosterior, or register a function with "
    "@pyro_esc.gaussian_posterior.register(YourGuide) (see pyro_esc.posterior)."
)


class GaussianPosterior:
    """Gaussian summary of q(z | x) for B data points (the protocol's return value).

    Build it with one of the constructors, whichever matches the guide:

    - :meth:`from_scale`: diagonal covariances, q^(n) = Normal(nu^(n), diag(tau^(n))^2);
    - :meth:`from_scale_tril`: full covariances T^(n) = L^(n) L^(n)^T;
    - :meth:`from_covariance`: full covariances given directly;
    - :meth:`from_low_rank`: T^(n) = F^(n) F^(n)^T + diag(d^(n));
    - :meth:`from_joint`: one Gaussian over all points jointly (the per-point
      blocks enter only through their sum).

    Attributes: ``mean`` (B, H), ``variance`` (B, H) = diag T^(n), ``stddev``
    (B, H) = its square root, ``entropy`` (a scalar: sum_n H[q^(n)], or the
    joint entropy).
    """

    def __init__(self, mean, variance, entropy, stddev=None, scale_tril=None, cov_factor=None,
                 covariance_sum=None):
        # Use the constructors: they validate shapes and compute the entropy.
        self.mean = mean
        self.variance = variance
        self.stddev = variance.sqrt() if stddev is None else stddev
        self.entropy = entropy
        self._scale_tril = scale_tril
        self._cov_factor = cov_factor
        self._covariance_sum = covariance_sum

    def __repr__(self):
        kind = ("joint" if self._covariance_sum is not None else "full" if self._scale_tril is not None
                else "low-rank" if self._cov_factor is not None else "diagonal")
        return f"GaussianPosterior({kind}, num_points={self.num_points}, latent_dim={self.latent_dim})"

    @property
    def num_points(self):
        """B, the number of data points summarised."""
        return self.mean.size(0)

    @property
    def latent_dim(self):
        """H, the latent dimension."""
        return self.mean.size(1)

    @property
    def is_joint(self):
        """Whether q is one Gaussian over all points (no per-point covariance is known)."""
        return self._covariance_sum is not None

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_scale(cls, mean, scale):
        """Diagonal Gaussians: ``mean`` (B, H) and standard deviations ``scale`` (broadcastable to (B, H))."""
        mean = _check_mean(mean)
        scale = _check_like(scale, mean, "scale")
        # The entropy of the flattened scales is the total over points (one log-sum).
        return cls(mean, scale.square(), entropy_from_scale(scale.reshape(-1)), stddev=scale)

    @classmethod
    def from_scale_tril(cls, mean, scale_tril):
        """Full-covariance Gaussians: ``mean`` (B, H) and Cholesky factors ``scale_tril`` (B, H, H)."""
        mean = _check_mean(mean)
        scale_tril = _check_like(scale_tril, mean, "scale_tril", extra=(mean.size(1),))
        scale_tril = scale_tril.tril()
        variance = scale_tril.square().sum(-1)
        return cls(mean, variance, entropy_from_scale_tril(scale_tril).sum(), scale_tril=scale_tril)

    @classmethod
    def from_covariance(cls, mean, covariance):
        """Full-covariance Gaussians given covariance matrices (B, H, H)."""
        mean = _check_mean(mean)
        covariance = _check_like(covariance, mean, "covariance", extra=(mean.size(1),))
        try:
            scale_tril = torch.linalg.cholesky(covariance)
        except RuntimeError as error:
            raise ValueError(f"covariance must be symmetric positive definite: {error}") from error
        return cls.from_scale_tril(mean, scale_tril)

    @classmethod
    def from_low_rank(cls, mean, cov_factor, cov_diag):
        """Gaussians with covariance F F^T + diag(d): ``cov_factor`` (B, H, R), ``cov_diag`` (B, H)."""
        mean = _check_mean(mean)
        if cov_factor.dim() != 3 or cov_factor.shape[:2] != mean.shape:
            raise ValueError(f"cov_factor must have shape (B, H, R) = ({mean.size(0)}, {mean.size(1)}, R), "
                             f"got {tuple(cov_factor.shape)}")
        cov_diag = _check_like(cov_diag, mean, "cov_diag")
        variance = cov_factor.square().sum(-1) + cov_diag
        entropy = entropy_from_low_rank(cov_factor, cov_diag).sum()
        return cls(mean, variance, entropy, cov_factor=(cov_factor, cov_diag))

    @classmethod
    def from_joint(cls, mean, variance, covariance_sum, entropy):
        """One Gaussian over all B points jointly.

        :param mean: per-point means (B, H).
        :param variance: per-point marginal variances (B, H).
        :param covariance_sum: sum of the per-point diagonal blocks, sum_n T^(n) (H, H).
        :param entropy: the joint entropy (a scalar).
        """
        mean = _check_mean(mean)
        variance = _check_like(variance, mean, "variance")
        hidden = mean.size(1)
        if tuple(covariance_sum.shape) != (hidden, hidden):
            raise ValueError(f"covariance_sum must have shape ({hidden}, {hidden}), got {tuple(covariance_sum.shape)}")
        if entropy.dim() != 0:
            raise ValueError(f"entropy must be a scalar, got shape {tuple(entropy.shape)}")
        return cls(mean, variance, entropy, covariance_sum=covariance_sum)

    def point_entropies(self):
        """Per-point entropies H[q^(n)], shape (B,); not available for a joint posterior."""
        if self._covariance_sum is not None:
            raise ValueError("a joint posterior has no per-point entropies; use .entropy (the joint entropy)")
        if self._scale_tril is not None:
            return entropy_from_scale_tril(self._scale_tril)
        if self._cov_factor is not None:
            return entropy_from_low_rank(*self._cov_factor)
        return entropy_from_scale(self.stddev)

    # ------------------------------------------------------------ trace term

    def trace_terms(self, dictionary):
        """Per-point tr(W T^(n) W^T), shape (B,).

        Not available for a joint posterior, whose per-point blocks are only known summed.

        :param torch.Tensor dictionary: W, shape (D, H).
        """
        if self._covariance_sum is not None:
            raise ValueError("a joint posterior has no per-point covariances; use trace_term()")
        if self._scale_tril is None and self._cov_factor is None:
            return self.variance @ dictionary.square().sum(0)
        gram = dictionary.T @ dictionary
        if self._scale_tril is not None:
            tril = self._scale_tril
            return ((gram @ tril) * tril).sum((-2, -1))
        factor, diag = self._cov_factor
        return ((gram @ factor) * factor).sum((-2, -1)) + diag @ gram.diagonal()

    def trace_term(self, dictionary):
        """sum_n tr(W T^(n) W^T), a scalar.

        :param torch.Tensor dictionary: W, shape (D, H).
        """
        if self._covariance_sum is not None:
            return trace_of_product(dictionary.T @ dictionary, self._covariance_sum)
        if self._scale_tril is None and self._cov_factor is None:
            # Diagonal: sum_h ||w_h||^2 sum_n tau_nh^2, summing over points first.
            return self.variance.sum(0) @ dictionary.square().sum(0)
        return self.trace_terms(dictionary).sum()

    def per_point_distribution(self):
        """The B per-point Gaussians q^(n) as one distribution: batch shape (B,), event shape (H,).

            q^(n)(z) = Normal(z; nu^(n), T^(n)),   independent over n

        Diagonal posteriors give ``Normal(nu, tau).to_event(1)``, full ones
        ``MultivariateNormal(nu, scale_tril=L)``, low-rank ones
        ``LowRankMultivariateNormal(nu, F, d)`` (Pyro's classes, which subclass
        torch's). Use it to sample from q or to evaluate log q (e.g. importance
        sampling); it shares the summary's tensors, so gradients flow to the guide.

        A joint posterior (one Gaussian over all points, e.g. AutoMultivariateNormal)
        knows its per-point covariance blocks only summed and raises a ValueError.
        """
        if self._covariance_sum is not None:
            raise ValueError("a joint posterior (one Gaussian over all data points) has no per-point "
                             "covariances, so it has no per-point distribution; use a per-point guide "
                             "(AutoNormal, LocalMultivariateNormal, AmortizedNormal) instead")
        if self._scale_tril is not None:
            return MultivariateNormal(self.mean, scale_tril=self._scale_tril)
        if self._cov_factor is not None:
            factor, diag = self._cov_factor
            return LowRankMultivariateNormal(self.mean, factor, diag)
        return Normal(self.mean, self.stddev).to_event(1)


def _check_mean(mean):
    if not isinstance(mean, torch.Tensor) or mean.dim() != 2:
        raise ValueError(f"mean must be a tensor of shape (B, H), got "
                         f"{tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__}")
    return mean


def _check_like(value, mean, name, extra=()):
    shape = tuple(mean.shape) + tuple(extra)
    if isinstance(value, torch.Tensor) and value.shape == shape:
        return value
    try:
        return torch.as_tensor(value, dtype=mean.dtype, device=mean.device).expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} must have shape {shape} (or broadcast to it), "
                         f"got {tuple(torch.as_tensor(value).shape)}") from None


# ---------------------------------------------------------------- the protocol


@functools.singledispatch
def gaussian_posterior(guide, x, subsample=None):
    """The Gaussian summary of ``guide``'s q(z | x) for the points ``x[subsample]``.

    This is the one extension point for guides (see the module docstring for
    the lookup order and :class:`GaussianPosterior` for the return value).

    :param guide: a Pyro guide for :class:`~pyro_esc.SparseCoding`.
    :param torch.Tensor x: all N data points, shape (N, D), as passed to the model.
    :param torch.Tensor subsample: optional indices of the minibatch (B,).
    :rtype: GaussianPosterior
    """
    method = getattr(guide, "gaussian_posterior", None)
    if callable(method):
        return method(x, subsample)
    return posterior_from_trace(guide, x, subsample)


@gaussian_posterior.register(AutoDelta)
def _autodelta_posterior(guide, x, subsample=None):
    raise ValueError(f"AutoDelta is a point estimate, not a Gaussian guide. Supported guides: "
                     f"{SUPPORTED_GUIDES}. {HOW_TO_ADD}")


@gaussian_posterior.register(AutoNormal)
def _autonormal_posterior(guide, x, subsample=None):
    _ensure_prototype(guide, x, subsample)
    _check_latent_sites(guide)
    loc, scale = _read_autonormal_params(guide)
    _check_per_point_shape(guide, loc, x)
    if subsample is not None:
        loc, scale = loc[subsample], scale[subsample]
    return GaussianPosterior.from_scale(loc, scale)


@gaussian_posterior.register(AutoContinuous)
def _autocontinuous_posterior(guide, x, subsample=None):
    _ensure_prototype(guide, x, subsample)
    _check_latent_sites(guide)
    name = type(guide).__name__
    if subsample is not None:
        raise ValueError(f"{name} is one Gaussian over all data points jointly and cannot be "
                         f"subsampled; use AutoNormal or LocalMultivariateNormal for minibatches")
    distribution = _read_posterior(guide, x)
    return joint_posterior(distribution, x.size(0), guide_name=name)


# PyroModule params reach the param store (and so SVI's optimiser) only when
# read inside the module's Pyro context; pyro_method enters it.
_read_autonormal_params = pyro_method(lambda guide: (guide.locs.z, guide.scales.z))
_read_posterior = pyro_method(lambda guide, x: guide.get_posterior(x))


def _ensure_prototype(guide, x, subsample):
    # Autoguides create their parameters lazily on the first call.
    if guide.prototype_trace is None:
        with poutine.block(hide_types=["sample"]):
            guide(x, **({} if subsample is None else {"subsample": subsample}))


def _check_latent_sites(guide):
    names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    if names != ["z"]:
        raise ValueError(f"{type(guide).__name__} was built for a model with latent sites {names}; "
                         f"the closed-form objectives need a SparseCoding model (one latent site 'z')")


def _check_per_point_shape(guide, loc, x):
    if loc.dim() != 2 or loc.size(0) != x.size(0):
        raise ValueError(f"{type(guide).__name__} holds parameters for {loc.shape[0]} data points, "
                         f"but x has {x.size(0)}; build a new guide for this data")


def joint_posterior(distribution, num_points, guide_name="guide"):
    """Summarise one Gaussian over all points' latents z.reshape(-1) (length N H, point-major).

    Handles Normal (diagonal), MultivariateNormal and LowRankMultivariateNormal.
    """
    base = _unwrap_independent(distribution)
    # One Gaussian over the whole latent vector: a diagonal Normal's batch shape is
    # that vector; a multivariate one must have no batch shape.
    joint = isinstance(distribution, tdist.Distribution) and distribution.batch_shape == torch.Size()
    if not _is_gaussian(base) or not joint:
        raise ValueError(f"{guide_name}'s posterior is {type(distribution).__name__}, not one Gaussian. "
                         f"Supported guides: {SUPPORTED_GUIDES}. {HOW_TO_ADD}")
    size = base.loc.numel()
    if size % num_points:
        raise ValueError(f"{guide_name}'s joint latent has size {size}, not a multiple of N = {num_points}")
    hidden = size // num_points
    mean = base.loc.reshape(num_points, hidden)
    if isinstance(base, tdist.Normal):
        return GaussianPosterior.from_scale(mean, base.scale.expand(size).reshape(num_points, hidden))
    if isinstance(base, tdist.LowRankMultivariateNormal):
        factor, diag = base.cov_factor, base.cov_diag
        rows = factor.reshape(num_points, hidden, -1)
        variance = (factor.square().sum(-1) + diag).reshape(num_points, hidden)
        covariance_sum = torch.einsum("nik,njk->ij", rows, rows) + torch.diag(diag.reshape(num_points, hidden).sum(0))
        entropy = entropy_from_low_rank(factor, diag)
        return GaussianPosterior.from_joint(mean, variance, covariance_sum, entropy)
    tril = base.scale_tril
    rows = tril.reshape(num_points, hidden, size)
    variance = rows.square().sum(-1)
    covariance_sum = torch.einsum("nik,njk->ij", rows, rows)
    return GaussianPosterior.from_joint(mean, variance, covariance_sum, entropy_from_scale_tril(tril))


def _unwrap_independent(distribution):
    while isinstance(distribution, tdist.Independent):
        distribution = distribution.base_dist
    return distribution


# ------------------------------------------------------- automatic recognition


def posterior_from_trace(guide, x, subsample=None):
    """Recognise a Gaussian guide by running it once and reading its ``"z"`` site.

    The ``"z"`` site's distribution must be Gaussian (Normal, possibly wrapped
    in Independent, MultivariateNormal or LowRankMultivariateNormal) with batch
    shape (B,) and event shape (H,); or ``"z"`` must copy (a reshape of) a
    single auxiliary Gaussian site, as Pyro's autoguides do. The guide is
    called as ``guide(x)`` or ``guide(x, subsample=subsample)``.
    """
    name = getattr(guide, "__name__", type(guide).__name__)
    kwargs = {} if subsample is None else {"subsample": subsample}
    # Hide the sample sites from outer handlers, but let params through so that
    # SVI's parameter capture still sees (and trains) the guide's parameters.
    with poutine.block(hide_types=["sample"]):
        trace = poutine.trace(guide).get_trace(x, **kwargs)
    site = trace.nodes.get("z")
    if site is None or site["type"] != "sample":
        raise ValueError(f"{name} has no sample site 'z'. Supported guides: {SUPPORTED_GUIDES}. {HOW_TO_ADD}")
    num_points = x.size(0) if subsample is None else subsample.size(0)
    base = _unwrap_independent(site["fn"])
    if _is_gaussian(base):
        return _per_point_posterior(base, num_points, name)
    auxiliary = [s for s in trace.nodes.values()
                 if s["type"] == "sample" and s["infer"].get("is_auxiliary") and _is_gaussian(_unwrap_independent(s["fn"]))]
    if isinstance(base, Delta) and len(auxiliary) == 1:
        aux = auxiliary[0]
        # The summary describes "z" only if "z" is the auxiliary value itself (an
        # identity transform, as for real-valued latents); a flow or any other
        # transform would make it wrong, so check rather than assume.
        if aux["value"].numel() == site["value"].numel() and torch.equal(aux["value"].reshape(site["value"].shape), site["value"]):
            aux_base = _unwrap_independent(aux["fn"])
            if aux["value"].dim() == 1:
                return joint_posterior(aux["fn"], num_points, name)
            return _per_point_posterior(aux_base, num_points, name)
    wrapped = "" if base is site["fn"] else f" (in {type(site['fn']).__name__})"
    raise ValueError(f"{name}'s 'z' site is {type(base).__name__}{wrapped}, not a Gaussian that the closed-form "
                     f"objectives can read. Supported guides: {SUPPORTED_GUIDES}. {HOW_TO_ADD}")


def _is_gaussian(distribution):
    return isinstance(distribution, (tdist.Normal, tdist.MultivariateNormal, tdist.LowRankMultivariateNormal))


def _per_point_posterior(base, num_points, name):
    if isinstance(base, tdist.LowRankMultivariateNormal):
        mean = base.loc.expand(base.batch_shape + base.event_shape)
        posterior = GaussianPosterior.from_low_rank(
            mean, base.cov_factor.expand(mean.shape + base.cov_factor.shape[-1:]), base.cov_diag.expand(mean.shape))
    elif isinstance(base, tdist.MultivariateNormal):
        mean = base.loc.expand(base.batch_shape + base.event_shape)
        posterior = GaussianPosterior.from_scale_tril(mean, base.scale_tril.expand(mean.shape + mean.shape[-1:]))
    else:
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        posterior = GaussianPosterior.from_scale(loc, scale)
    if posterior.num_points != num_points:
        raise ValueError(f"{name}'s 'z' site covers {posterior.num_points} data points, expected {num_points}")
    return posterior
