"""The guide protocol: what a guide must tell the closed-form objectives.

The closed-form objectives never sample. From a guide they need, for the B data
points of the current batch, a Gaussian summary of q(z | x^(n)):

- the means nu^(n) (B, H) and marginal variances tau^2 (B, H), for E|z_h|;
- the total entropy sum_n H[q^(n)] (or the joint entropy of a guide that is
  one Gaussian over all points);
- the covariances T^(n), only through the trace term sum_n tr(W T^(n) W^T).

:class:`GaussianPosterior` holds exactly that (an abstract base with one
subclass per covariance family: :class:`DiagonalGaussianPosterior`,
:class:`FullGaussianPosterior`, :class:`LowRankGaussianPosterior`,
:class:`JointGaussianPosterior`), and :func:`gaussian_posterior` is the one
protocol that produces it from ``(guide, x, subsample)``. It finds the
summary in this order:

1. a function registered for the guide's class with
   ``@gaussian_posterior.register(GuideClass)`` (Pyro's autoguides are
   registered here and read their parameters directly, without sampling);
2. a method ``guide.gaussian_posterior(x, subsample=None)``;
3. automatic recognition: the guide is run once under a trace and its ``"z"``
   site (or the single auxiliary site that ``"z"`` copies) must be a
   Normal, MultivariateNormal or LowRankMultivariateNormal.

A guide that is none of these gets a ValueError that says how to add it.
Whichever route is taken runs inside the guide's Pyro context (for a
PyroModule), so that SVI sees and trains the parameters it reads.
"""

import abc
import functools

import torch
import torch.distributions as tdist
from torch import nn

from pyro import poutine
from pyro.distributions import Delta, LowRankMultivariateNormal, MultivariateNormal, Normal
from pyro.infer.autoguide import AutoContinuous, AutoDelta, AutoNormal
from pyro.nn import PyroModule

from .._pyro_internals import autonormal_loc_and_scale, module_context, param_site_unconstrained
from .rows import rows_posterior
from ..distributions.gaussian import (
    entropy_from_low_rank,
    entropy_from_scale,
    entropy_from_scale_tril,
    trace_of_product,
)

__all__ = [
    "DiagonalGaussianPosterior",
    "FullGaussianPosterior",
    "GaussianPosterior",
    "JointGaussianPosterior",
    "LowRankGaussianPosterior",
    "gaussian_posterior",
    "joint_posterior",
    "posterior_from_trace",
]

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


class GaussianPosterior(abc.ABC):
    """Gaussian summary of q(z | x) for B data points (the protocol's return value).

    An abstract base with one subclass per covariance family. Build it with
    the constructor that matches the guide; each returns its family's class:

    - :meth:`from_scale`: diagonal covariances, q^(n) = Normal(nu^(n), diag(tau^(n))^2)
      (:class:`DiagonalGaussianPosterior`);
    - :meth:`from_scale_tril`: full covariances T^(n) = L^(n) L^(n)^T
      (:class:`FullGaussianPosterior`);
    - :meth:`from_covariance`: full covariances given directly (:class:`FullGaussianPosterior`);
    - :meth:`from_low_rank`: T^(n) = F^(n) F^(n)^T + diag(d^(n))
      (:class:`LowRankGaussianPosterior`);
    - :meth:`from_joint`: one Gaussian over all points jointly, whose per-point
      blocks enter only through their sum (:class:`JointGaussianPosterior`).

    Attributes: ``mean`` (B, H), ``variance`` (B, H) = diag T^(n), ``stddev``
    (B, H) = its square root, ``entropy`` (a scalar: sum_n H[q^(n)], or the
    joint entropy). Each family computes :meth:`point_entropies`,
    :meth:`trace_terms`, :meth:`trace_term`, :meth:`per_point_distribution`,
    :meth:`covariance_matrices` and :meth:`index_select` in its own terms.

    Example::

        >>> import torch
        >>> from pyro_esc import GaussianPosterior
        >>> q = GaussianPosterior.from_scale(torch.zeros(2, 3), torch.ones(2, 3))   # 2 points, 3 latents
        >>> q.num_points, q.latent_dim, type(q).__name__
        (2, 3, 'DiagonalGaussianPosterior')
        >>> round(float(q.entropy), 4)                  # 6 standard normals: 6 x 0.5 log(2 pi e)
        8.5136

    """

    #: The family's name, as shown by ``repr``.
    family = None

    def __init__(self, mean, variance, entropy, stddev=None):
        # Subclasses validate their arguments and compute the entropy before calling this.
        self.mean = mean
        self.variance = variance
        self.stddev = variance.sqrt() if stddev is None else stddev
        self.entropy = entropy

    def __repr__(self):
        return f"GaussianPosterior({self.family}, num_points={self.num_points}, latent_dim={self.latent_dim})"

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
        return False

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_scale(cls, mean, scale):
        """Diagonal Gaussians: ``mean`` (B, H) and standard deviations ``scale``.

        ``scale`` has shape (B, H), or is a scalar, or a 2-D shape that broadcasts to
        (B, H): (B, 1) for one value per point, (1, H) for one value per latent.

        :rtype: DiagonalGaussianPosterior
        """
        return DiagonalGaussianPosterior(mean, scale)

    @classmethod
    def from_scale_tril(cls, mean, scale_tril):
        """Full-covariance Gaussians: ``mean`` (B, H) and Cholesky factors ``scale_tril`` (B, H, H).

        :rtype: FullGaussianPosterior
        """
        return FullGaussianPosterior(mean, scale_tril)

    @classmethod
    def from_covariance(cls, mean, covariance):
        """Full-covariance Gaussians given covariance matrices (B, H, H).

        :rtype: FullGaussianPosterior
        """
        mean = _check_mean(mean)
        covariance = _check_like(covariance, mean, "covariance", extra=(mean.size(1),))
        try:
            scale_tril = torch.linalg.cholesky(covariance)
        except RuntimeError as error:
            raise ValueError(f"covariance must be symmetric positive definite: {error}") from error
        return FullGaussianPosterior(mean, scale_tril)

    @classmethod
    def from_low_rank(cls, mean, cov_factor, cov_diag):
        """Gaussians with covariance F F^T + diag(d): ``cov_factor`` (B, H, R), ``cov_diag`` (B, H).

        :rtype: LowRankGaussianPosterior
        """
        return LowRankGaussianPosterior(mean, cov_factor, cov_diag)

    @classmethod
    def from_joint(cls, mean, variance, covariance_sum, entropy):
        """One Gaussian over all B points jointly.

        :param mean: per-point means (B, H).
        :param variance: per-point marginal variances (B, H).
        :param covariance_sum: sum of the per-point diagonal blocks, sum_n T^(n) (H, H).
        :param entropy: the joint entropy (a scalar).
        :rtype: JointGaussianPosterior
        """
        return JointGaussianPosterior(mean, variance, covariance_sum, entropy)

    # ------------------------------------------------------------ per family

    @abc.abstractmethod
    def point_entropies(self):
        """Per-point entropies H[q^(n)], shape (B,); not available for a joint posterior."""

    @abc.abstractmethod
    def trace_terms(self, dictionary):
        """Per-point tr(W T^(n) W^T), shape (B,).

        Not available for a joint posterior, whose per-point blocks are only known summed.

        :param torch.Tensor dictionary: W, shape (D, H).
        """

    def trace_term(self, dictionary):
        """sum_n tr(W T^(n) W^T), a scalar.

        :param torch.Tensor dictionary: W, shape (D, H).
        """
        return self.trace_terms(dictionary).sum()

    @abc.abstractmethod
    def per_point_distribution(self):
        """The B per-point Gaussians q^(n) as one distribution: batch shape (B,), event shape (H,).

        ::

            q^(n)(z) = Normal(z; nu^(n), T^(n)),   independent over n

        Diagonal posteriors give ``Normal(nu, tau).to_event(1)``, full ones
        ``MultivariateNormal(nu, scale_tril=L)``, low-rank ones
        ``LowRankMultivariateNormal(nu, F, d)`` (Pyro's classes, which subclass
        torch's). Use it to sample from q or to evaluate log q (e.g. importance
        sampling); it shares the summary's tensors, so gradients flow to the guide.

        A joint posterior (one Gaussian over all points, e.g. AutoMultivariateNormal)
        knows its per-point covariance blocks only summed and raises a ValueError.
        """

    @abc.abstractmethod
    def covariance_matrices(self):
        """The per-point covariances T^(n), shape (B, H, H); not available for a joint posterior."""

    @abc.abstractmethod
    def index_select(self, rows):
        """The summary of the points ``rows`` only (a 1-D index tensor), of the same family.

        Not available for a joint posterior, whose entropy does not split over points.
        """

    @abc.abstractmethod
    def _arguments(self):
        """The constructor's arguments that rebuild this summary (for :meth:`to` and :meth:`detach`)."""

    def to(self, *args, **kwargs):
        """The same summary with its tensors moved/cast by ``Tensor.to(*args, **kwargs)``."""
        return type(self)(*(value.to(*args, **kwargs) for value in self._arguments()))

    def detach(self):
        """The same summary, cut from the autograd graph."""
        return type(self)(*(value.detach() for value in self._arguments()))


class DiagonalGaussianPosterior(GaussianPosterior):
    """Diagonal Gaussians, q^(n) = Normal(nu^(n), diag(tau^(n))^2).

    :param torch.Tensor mean: nu, shape (B, H).
    :param scale: tau, shape (B, H), a scalar, or (B, 1) / (1, H) (see :meth:`GaussianPosterior.from_scale`).
    """

    family = "diagonal"

    def __init__(self, mean, scale):
        mean = _check_mean(mean)
        scale = _check_like(scale, mean, "scale")
        # The entropy of the flattened scales is the total over points (one log-sum).
        super().__init__(mean, scale.square(), entropy_from_scale(scale.reshape(-1)), stddev=scale)

    def point_entropies(self):
        return entropy_from_scale(self.stddev)

    def trace_terms(self, dictionary):
        return self.variance @ dictionary.square().sum(0)

    def trace_term(self, dictionary):
        # sum_h ||w_h||^2 sum_n tau_nh^2, summing over points first.
        return self.variance.sum(0) @ dictionary.square().sum(0)

    def per_point_distribution(self):
        return Normal(self.mean, self.stddev).to_event(1)

    def covariance_matrices(self):
        return torch.diag_embed(self.variance)

    def index_select(self, rows):
        return DiagonalGaussianPosterior(self.mean.index_select(0, rows), self.stddev.index_select(0, rows))

    def _arguments(self):
        return self.mean, self.stddev


class FullGaussianPosterior(GaussianPosterior):
    """Full-covariance Gaussians, q^(n) = Normal(nu^(n), L^(n) L^(n)^T).

    :param torch.Tensor mean: nu, shape (B, H).
    :param torch.Tensor scale_tril: L, shape (B, H, H); only its lower triangle is used.
    """

    family = "full"

    def __init__(self, mean, scale_tril):
        mean = _check_mean(mean)
        scale_tril = _check_like(scale_tril, mean, "scale_tril", extra=(mean.size(1),)).tril()
        #: The Cholesky factors L, shape (B, H, H).
        self.scale_tril = scale_tril
        super().__init__(mean, scale_tril.square().sum(-1), entropy_from_scale_tril(scale_tril).sum())

    def point_entropies(self):
        return entropy_from_scale_tril(self.scale_tril)

    def trace_terms(self, dictionary):
        # tr(W L L^T W^T) = sum_ij (W^T W L)_ij L_ij: one (H, H) Gram matrix instead of B (D, H) products.
        # einsum contracts the (H, H) Gram matrix with all B factors in one matrix product.
        gram = dictionary.T @ dictionary
        return torch.einsum("ij,bjk->bik", gram, self.scale_tril).mul(self.scale_tril).sum((-2, -1))

    def per_point_distribution(self):
        return MultivariateNormal(self.mean, scale_tril=self.scale_tril)

    def covariance_matrices(self):
        return self.scale_tril @ self.scale_tril.transpose(-1, -2)

    def index_select(self, rows):
        return FullGaussianPosterior(self.mean.index_select(0, rows), self.scale_tril.index_select(0, rows))

    def _arguments(self):
        return self.mean, self.scale_tril


class LowRankGaussianPosterior(GaussianPosterior):
    """Gaussians with low-rank plus diagonal covariance, T^(n) = F^(n) F^(n)^T + diag(d^(n)).

    :param torch.Tensor mean: nu, shape (B, H).
    :param torch.Tensor cov_factor: F, shape (B, H, R).
    :param cov_diag: d > 0, shape (B, H) (or a scalar, or (B, 1) / (1, H)).
    """

    family = "low-rank"

    def __init__(self, mean, cov_factor, cov_diag):
        mean = _check_mean(mean)
        if not isinstance(cov_factor, torch.Tensor) or cov_factor.dim() != 3 or cov_factor.shape[:2] != mean.shape:
            raise ValueError(f"cov_factor must have shape (B, H, R) = ({mean.size(0)}, {mean.size(1)}, R), "
                             f"got {_describe(cov_factor)}")
        cov_diag = _check_like(cov_diag, mean, "cov_diag")
        #: F, shape (B, H, R).
        self.cov_factor = cov_factor
        #: d, shape (B, H).
        self.cov_diag = cov_diag
        variance = cov_factor.square().sum(-1) + cov_diag
        super().__init__(mean, variance, entropy_from_low_rank(cov_factor, cov_diag).sum())

    def point_entropies(self):
        return entropy_from_low_rank(self.cov_factor, self.cov_diag)

    def trace_terms(self, dictionary):
        gram = dictionary.T @ dictionary
        factor = self.cov_factor
        return ((gram @ factor) * factor).sum((-2, -1)) + self.cov_diag @ gram.diagonal()

    def per_point_distribution(self):
        return LowRankMultivariateNormal(self.mean, self.cov_factor, self.cov_diag)

    def covariance_matrices(self):
        return self.cov_factor @ self.cov_factor.transpose(-1, -2) + torch.diag_embed(self.cov_diag)

    def index_select(self, rows):
        return LowRankGaussianPosterior(self.mean.index_select(0, rows), self.cov_factor.index_select(0, rows),
                                        self.cov_diag.index_select(0, rows))

    def _arguments(self):
        return self.mean, self.cov_factor, self.cov_diag


class JointGaussianPosterior(GaussianPosterior):
    """One Gaussian over all B points' latents jointly (e.g. Pyro's AutoMultivariateNormal).

    Only the per-point means and marginal variances, the sum of the per-point
    covariance blocks sum_n T^(n) and the joint entropy are kept: that is all
    the closed-form objectives need. Anything per point beyond the marginals
    (per-point entropies, covariances, distributions, a subset of the points)
    raises a ValueError.

    :param torch.Tensor mean: per-point means, shape (B, H).
    :param variance: per-point marginal variances, shape (B, H).
    :param torch.Tensor covariance_sum: sum_n T^(n), shape (H, H).
    :param torch.Tensor entropy: the joint entropy, a scalar.
    """

    family = "joint"

    def __init__(self, mean, variance, covariance_sum, entropy):
        mean = _check_mean(mean)
        variance = _check_like(variance, mean, "variance")
        n_latents = mean.size(1)
        if not isinstance(covariance_sum, torch.Tensor) or tuple(covariance_sum.shape) != (n_latents, n_latents):
            raise ValueError(f"covariance_sum must have shape ({n_latents}, {n_latents}), "
                             f"got {_describe(covariance_sum)}")
        if not isinstance(entropy, torch.Tensor) or entropy.dim() != 0:
            raise ValueError(f"entropy must be a scalar tensor, got {_describe(entropy)}")
        #: sum_n T^(n), shape (H, H).
        self.covariance_sum = covariance_sum
        super().__init__(mean, variance, entropy)

    @property
    def is_joint(self):
        return True

    def point_entropies(self):
        raise ValueError("a joint posterior has no per-point entropies; use .entropy (the joint entropy)")

    def trace_terms(self, dictionary):
        raise ValueError("a joint posterior has no per-point covariances; use trace_term()")

    def trace_term(self, dictionary):
        return trace_of_product(dictionary.T @ dictionary, self.covariance_sum)

    def per_point_distribution(self):
        raise ValueError("a joint posterior (one Gaussian over all data points) has no per-point "
                         "covariances, so it has no per-point distribution; use a per-point guide "
                         "(AutoNormal, LocalMultivariateNormal, AmortizedNormal) instead")

    def covariance_matrices(self):
        raise ValueError("a joint posterior has no per-point covariances, only their sum (.covariance_sum)")

    def index_select(self, rows):
        raise ValueError("a joint posterior cannot be restricted to some of its points: its joint entropy "
                         "does not split over points")

    def _arguments(self):
        return self.mean, self.variance, self.covariance_sum, self.entropy


def _describe(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_mean(mean):
    if not isinstance(mean, torch.Tensor) or mean.dim() != 2:
        raise ValueError(f"mean must be a tensor of shape (B, H), got {_describe(mean)}")
    return mean


def _check_like(value, mean, name, extra=()):
    # Only unambiguous shapes broadcast: the full shape, a scalar, or a shape with as many
    # dimensions (sizes 1 where the value is shared). A 1-D value of length B == H could mean
    # per point or per latent, so a value with fewer dimensions is refused rather than guessed.
    shape = tuple(mean.shape) + tuple(extra)
    if isinstance(value, torch.Tensor) and value.shape == shape:
        return value
    try:
        tensor = torch.as_tensor(value, dtype=mean.dtype, device=mean.device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor of shape {shape} (or broadcast to it): {error}") from None
    if 0 < tensor.dim() < len(shape):
        if len(shape) == 2:
            hint = (f"pass shape (B, 1) = ({shape[0]}, 1) for one value per point or (1, H) = (1, {shape[1]}) "
                    f"for one value per latent")
        else:
            hint = f"give it {len(shape)} dimensions (size 1 where the value is shared) or pass a scalar"
        raise ValueError(f"{name} must have shape {shape}, a scalar, or a shape with {len(shape)} dimensions "
                         f"that broadcasts to it; got shape {tuple(tensor.shape)}, which is ambiguous: {hint}")
    if tensor.dim() in (0, len(shape)):
        try:
            return tensor.expand(shape)
        except RuntimeError:
            pass
    raise ValueError(f"{name} must have shape {shape} (or broadcast to it), got {tuple(tensor.shape)}")


# ---------------------------------------------------------------- the protocol


@functools.singledispatch
def _find_posterior(guide, x, subsample=None):
    # The lookup behind gaussian_posterior: registered functions, else the method, else tracing.
    method = getattr(guide, "gaussian_posterior", None)
    if callable(method):
        return method(x, subsample)
    return posterior_from_trace(guide, x, subsample)


def gaussian_posterior(guide, x, subsample=None):
    """The Gaussian summary of ``guide``'s q(z | x) for the points ``x[subsample]``.

    This is the one extension point for guides (see the module docstring for
    the lookup order and :class:`GaussianPosterior` for the return value).
    Register a reader for a guide class with
    ``@gaussian_posterior.register(GuideClass)``.

    The reader (registered function, method or tracing) runs inside the
    guide's Pyro context when the guide is a :class:`~pyro.nn.PyroModule`, so
    its parameters are read through ``pyro.param`` and SVI trains them even if
    the method lacks ``@pyro_method``. A plain :class:`torch.nn.Module` guide
    must register its parameters itself (``pyro.module(name, self)``); if some
    are not seen by Pyro, a ValueError says so, instead of training silently
    leaving them alone.

    Example::

        >>> import pyro, torch
        >>> from pyro_esc import LocalMultivariateNormal, SparseCoding, gaussian_posterior
        >>> pyro.clear_param_store()
        >>> x = torch.randn(5, 4)
        >>> model = SparseCoding(4, 3)
        >>> q = gaussian_posterior(LocalMultivariateNormal(model), x, subsample=torch.tensor([0, 2]))
        >>> tuple(q.mean.shape), type(q).__name__
        ((2, 3), 'FullGaussianPosterior')

    :param guide: a Pyro guide for :class:`~pyro_esc.SparseCoding`.
    :param torch.Tensor x: all N data points, shape (N, D), as passed to the model.
    :param torch.Tensor subsample: optional indices of the minibatch (B,).
    :rtype: GaussianPosterior
    """
    reader = _find_posterior.dispatch(type(guide))
    with module_context(guide):
        if isinstance(guide, nn.Module) and not isinstance(guide, PyroModule):
            return _read_checking_registration(reader, guide, x, subsample)
        return reader(guide, x, subsample)


gaussian_posterior.register = _find_posterior.register
gaussian_posterior.dispatch = _find_posterior.dispatch
gaussian_posterior.registry = _find_posterior.registry


def _read_checking_registration(reader, guide, x, subsample):
    # SVI trains exactly the params that pass through pyro.param while the loss is computed.
    # A plain nn.Module's parameters do so only via pyro.module (or a PyroModule part).
    with poutine.trace(param_only=True) as capture:
        posterior = reader(guide, x, subsample)
    seen = {id(param_site_unconstrained(site)) for site in capture.trace.nodes.values() if site["type"] == "param"}
    unseen = [name for name, value in guide.named_parameters() if value.requires_grad and id(value) not in seen]
    if unseen:
        name = type(guide).__name__
        listed = ", ".join(unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise ValueError(
            f"guide {name} is a torch.nn.Module but not a PyroModule, and reading its Gaussian posterior does "
            f"not register its parameters ({listed}) with Pyro's param store, so SVI would never train them. "
            f"Make {name} a pyro.nn.PyroModule, or call pyro.module({name!r}, self) at the start of its "
            f"gaussian_posterior (and forward) method.")
    return posterior


@gaussian_posterior.register(GaussianPosterior)
def _posterior_as_guide(posterior, x, subsample=None):
    # A summary (e.g. from pyro_esc.encode) stands for its own guide in the closed forms and in
    # log_likelihood: held_out_elbo(model, encode(model, guide, x), x) needs no guide object.
    if posterior.num_points != x.size(0):
        raise ValueError(f"the GaussianPosterior describes {posterior.num_points} points, but x has {x.size(0)}")
    return posterior if subsample is None else posterior.index_select(subsample)


@gaussian_posterior.register(AutoDelta)
def _autodelta_posterior(guide, x, subsample=None):
    raise ValueError(f"AutoDelta is a point estimate, not a Gaussian guide. Supported guides: "
                     f"{SUPPORTED_GUIDES}. {HOW_TO_ADD}")


@gaussian_posterior.register(AutoNormal)
def _autonormal_posterior(guide, x, subsample=None):
    # Runs inside the guide's Pyro context (gaussian_posterior enters it), so the params
    # reach the param store and SVI's optimiser. The guide's own (overridable) reader is used.
    _ensure_prototype(guide, x, subsample)
    _check_latent_sites(guide)
    loc, scale = autonormal_loc_and_scale(guide, "z")
    _check_per_point_shape(guide, loc, x)
    if subsample is not None:
        loc, scale = loc[subsample], scale[subsample]
    return GaussianPosterior.from_scale(loc, scale)


@rows_posterior.register(AutoNormal)
def _autonormal_rows_posterior(guide, rows):
    # The rows of autonormal_row_names: the means and the scales of site "z".
    return GaussianPosterior.from_scale(*rows)


@gaussian_posterior.register(AutoContinuous)
def _autocontinuous_posterior(guide, x, subsample=None):
    _ensure_prototype(guide, x, subsample)
    _check_latent_sites(guide)
    name = type(guide).__name__
    if subsample is not None:
        raise ValueError(f"{name} is one Gaussian over all data points jointly and cannot be "
                         f"subsampled; use AutoNormal or LocalMultivariateNormal for minibatches")
    return joint_posterior(guide.get_posterior(x), x.size(0), guide_name=name)


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
    n_latents = size // num_points
    mean = base.loc.reshape(num_points, n_latents)
    if isinstance(base, tdist.Normal):
        return GaussianPosterior.from_scale(mean, base.scale.expand(size).reshape(num_points, n_latents))
    if isinstance(base, tdist.LowRankMultivariateNormal):
        factor, diag = base.cov_factor, base.cov_diag
        rows = factor.reshape(num_points, n_latents, -1)
        variance = (factor.square().sum(-1) + diag).reshape(num_points, n_latents)
        covariance_sum = (torch.einsum("nik,njk->ij", rows, rows)
                          + torch.diag(diag.reshape(num_points, n_latents).sum(0)))
        entropy = entropy_from_low_rank(factor, diag)
        return GaussianPosterior.from_joint(mean, variance, covariance_sum, entropy)
    tril = base.scale_tril
    rows = tril.reshape(num_points, n_latents, size)
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

    The closed-form objectives use only q's parameters, not its log-density, so
    effect handlers that reweight the guide's site cannot be honoured: a scale
    other than the one its plates' subsampling implies (``poutine.scale``) or a
    mask (``poutine.mask``) raises a ValueError rather than being ignored.
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
    _check_unweighted(site, name)
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
            _check_unweighted(aux, name)
            aux_base = _unwrap_independent(aux["fn"])
            if aux["value"].dim() == 1:
                return joint_posterior(aux["fn"], num_points, name)
            return _per_point_posterior(aux_base, num_points, name)
    wrapped = "" if base is site["fn"] else f" (in {type(site['fn']).__name__})"
    raise ValueError(f"{name}'s 'z' site is {type(base).__name__}{wrapped}, not a Gaussian that the closed-form "
                     f"objectives can read. Supported guides: {SUPPORTED_GUIDES}. {HOW_TO_ADD}")


def _check_unweighted(site, name):
    # Plate subsampling scales a site by full_size / size per frame; anything else came from a handler.
    mask = site["mask"]
    if mask is not None and mask is not True:
        raise ValueError(f"{name}'s site {site['name']!r} is masked (an effect handler such as poutine.mask); "
                         f"the closed-form objectives read q's parameters, not its log-density, and cannot "
                         f"honour a mask. Remove it, and pass the points to use as a subsample instead.")
    implied = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.size:
            implied *= frame.full_size / frame.size
    scale = torch.as_tensor(site["scale"], dtype=torch.float64)
    if not bool(torch.isclose(scale, scale.new_tensor(implied), rtol=1e-6, atol=0).all()):
        shown = f"{float(scale):g}" if scale.numel() == 1 else f"a tensor of shape {tuple(scale.shape)}"
        factor = f"{float(scale) / implied:g}" if scale.numel() == 1 else "..."
        raise ValueError(f"{name}'s site {site['name']!r} has scale {shown}, but its plates imply {implied:g}: an "
                         f"effect handler such as poutine.scale(guide, {factor}) reweights the guide. The closed-form "
                         f"objectives read q's parameters, not its log-density, and cannot honour that scale; "
                         f"remove the handler (to weight the loss, multiply the objective's value instead).")


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
