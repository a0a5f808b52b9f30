r"""The prior seam: what the rest of the package needs to know about p(z).

Every prior here is a factorised **scale family** whose negative log density is affine in one
fixed statistic phi of the latent::

    -log p(z; s) = sum_h [ A(s_h) + c(s_h) phi(z_h) ]          (A: log_normalizer, c: penalty)

Laplace(0, lambda) has phi(z) = ``|z|``, A = log(2 lambda), c = 1 / lambda; Normal(0, s^2) has
phi(z) = z^2, A = log(2 pi s^2) / 2, c = 1 / (2 s^2). For such a prior the cross-entropy of any
q against p depends on q only through E_q[phi(z_h)], so the ELBO's scales have a closed-form
optimum (the analogue of the paper's Theorem 2)::

    s_h* = argmin_s [ A(s) + c(s) m_h ],          m_h = 1/N sum_n E_q[phi(z_h^(n))]

and at s* the cross-entropy equals the prior's entropy, H[p(z; s*)] (the paper's Theorem 1:
the prior term of the ELBO becomes an entropy). :class:`Prior` is the base class; a new prior
subclasses it in one file (docs/guide/extending.md, "Adding a prior"). It must give:

- :meth:`Prior.distribution`: the torch distribution of one latent (sampling, log-likelihood,
  NUTS);
- :meth:`Prior.statistic`, :meth:`Prior.log_normalizer`, :meth:`Prior.penalty`: phi, A and c;
- :meth:`Prior.optimal_scale`: s* for a mean statistic m;
- :meth:`Prior.entropy`: H[p(z; s)], summed over the latents.

The expectations E_q[phi(z)] under a Gaussian q come for free (quadrature split at 0, so a kink
there costs no accuracy) and so do their derivatives, which the per-point solver uses; a prior with closed forms
overrides :meth:`Prior.expected_statistic` and :meth:`Prior.statistic_derivatives`. The
per-point solver's Newton method finds the optimum of each point's ELBO when -log p is convex
in z (a log-concave prior); for other priors it still ascends but the optimum may be local.

Priors are plain objects without tensors; they are named so that files can store them as data
(``name`` and :meth:`Prior.config`) and never as code: defining a subclass with a ``name``
registers it, and :func:`get_prior` builds it back.
"""

import math

import numpy as np
import torch

__all__ = ["Prior", "get_prior", "registered_priors"]

_REGISTRY = {}

#: Gauss-Legendre nodes on each side of 0 of the default rule for E_q[phi(z)] (:func:`quadrature_rule`).
QUADRATURE_NODES = 64
#: The rule covers mean +- QUADRATURE_WIDTH standard deviations.
QUADRATURE_WIDTH = 12.0

_SQRT_2PI = math.sqrt(2 * math.pi)


class Prior:
    """Base class of the factorised scale-family priors p(z; s) = prod_h p(z_h; s_h) (module docstring).

    Subclasses set ``name`` (a registered, file-safe name) and implement the five methods
    that raise NotImplementedError here. Instances compare equal when their class and
    :meth:`config` agree.

    Example (the Laplace prior that :class:`~pyro_esc.SparseCoding` uses by default)::

        >>> import torch
        >>> from pyro_esc.priors import get_prior
        >>> prior = get_prior("laplace")
        >>> m = torch.tensor([0.5, 2.0])            # mean E_q|z_h| of a posterior
        >>> scale = prior.optimal_scale(m)          # lambda* = m
        >>> bool(torch.allclose(prior.cross_entropy(m, scale), prior.entropy(scale)))
        True
    """

    #: The name files and the command line use (``SparseCoding(prior=name)``).
    name = None
    #: k with phi(c z) = c^k phi(z) for c > 0, if phi is homogeneous (Laplace 1, Gaussian 2). The EM
    #: route re-expresses its running sums when it rescales the latents, which needs it; None otherwise.
    degree = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Only a class that names itself registers: a subclass of Laplace that inherits "laplace" must not
        # take the name over from Laplace.
        if cls.__dict__.get("name") is not None:
            _REGISTRY[cls.name] = cls

    # ------------------------------------------------------------ what a prior must give

    def distribution(self, scale):
        """The distribution of the latents at scales ``scale`` (batch shape ``scale.shape``), centred at 0."""
        raise NotImplementedError

    def statistic(self, z):
        """phi(z), elementwise: -log p(z; s) = A(s) + c(s) phi(z)."""
        raise NotImplementedError

    def log_normalizer(self, scale):
        """A(s), elementwise."""
        raise NotImplementedError

    def penalty(self, scale):
        """c(s) > 0, elementwise: the weight of phi(z) in -log p."""
        raise NotImplementedError

    def optimal_scale(self, mean_statistic):
        """s* = argmin_s A(s) + c(s) m, elementwise, for a mean statistic m = E_q[phi(z)] > 0."""
        raise NotImplementedError

    def entropy(self, scale):
        """H[p(z; s)], summed over the last dimension."""
        raise NotImplementedError

    # ------------------------------------------------------------ derived (override for closed forms)

    def config(self):
        """The prior's settings as plain numbers (empty for priors without any); files store them."""
        return {}

    def cross_entropy(self, mean_statistic, scale):
        """E_q[-log p(z; s)] summed over the last dimension, given E_q[phi(z_h)] (any q)."""
        return (self.log_normalizer(scale) + self.penalty(scale) * mean_statistic).sum(-1)

    def expected_statistic(self, mean, scale):
        """E[phi(z)] for z ~ Normal(mean, scale^2), elementwise and differentiable.

        The default integrates phi against the Gaussian density by Gauss-Legendre quadrature on
        each side of 0 (:func:`quadrature_rule`), so a kink of phi at 0, as sparse priors have,
        costs no accuracy. Priors with a closed form override it.
        """
        points, weights = quadrature_rule(mean, scale)
        return (self.statistic(points) * weights).sum(-1)

    def statistic_derivatives(self, mean, scale):
        """E[phi], its first derivatives in (mean, scale) and its second derivatives, elementwise.

        Returns ``(value, d_mean, d_scale, d2_mean, d2_mean_scale, d2_scale)``, each of the
        inputs' shape. The per-point solver's Newton steps use them. The default differentiates
        the Gaussian density instead of phi (Stein's identities, with z = nu + tau eps), so phi
        needs no derivatives and kinks are fine::

            d/dnu  = E[phi eps] / tau            d2/dnu2     = E[phi (eps^2 - 1)] / tau^2
            d/dtau = E[phi (eps^2 - 1)] / tau    d2/dnu dtau = E[phi (eps^3 - 3 eps)] / tau^2
                                                 d2/dtau2    = E[phi (eps^4 - 5 eps^2 + 2)] / tau^2

        all by the quadrature rule of :meth:`expected_statistic`.
        """
        mean, scale = mean.detach(), scale.detach()
        points, weights = quadrature_rule(mean, scale)
        weighted = self.statistic(points) * weights
        eps = (points - mean.unsqueeze(-1)) / scale.unsqueeze(-1)
        square = eps.square()

        def expect(factor):
            return (weighted * factor).sum(-1)

        scale_sq = scale.square()
        return (weighted.sum(-1), expect(eps) / scale, expect(square - 1) / scale,
                expect(square - 1) / scale_sq, expect(eps * (square - 3)) / scale_sq,
                expect(square.square() - 5 * square + 2) / scale_sq)

    def scale_for_variance(self, variance):
        """The scale at which a latent has variance ``variance`` (initialisation from data)."""
        unit = self.distribution(torch.ones((), dtype=torch.float64)).variance
        return (torch.as_tensor(variance) / float(unit)).sqrt()

    def posterior_scale_at_zero_mean(self, penalty, curvature):
        """The scale tau of a per-latent Gaussian q = Normal(0, tau^2) at which the solver starts.

        The optimum of log tau - p E[phi(tau eps)] - k tau^2 / 2 in tau, with p the effective
        penalty and k the likelihood's curvature; any positive start is valid, so the default
        takes the likelihood's alone, corrected by one fixed-point step for the prior.
        """
        tau = curvature.rsqrt()
        _, _, d_scale, _, _, _ = self.statistic_derivatives(torch.zeros_like(tau), tau)
        return 1 / (penalty * d_scale + curvature * tau).clamp_min(torch.finfo(tau.dtype).tiny)

    # ------------------------------------------------------------ identity

    def __eq__(self, other):
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.config().items()))))

    def __repr__(self):
        settings = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({settings})"


def quadrature_rule(mean, scale, size=QUADRATURE_NODES, width=QUADRATURE_WIDTH):
    """Points and weights for E[f(z)], z ~ Normal(mean, scale^2): sum_i w_i f(z_i), elementwise.

    Gauss-Legendre with ``size`` nodes on each side of 0 of [mean - width scale, mean + width scale]
    (the mass outside is below 1e-30 at the default width), the weights carrying the Gaussian
    density. Splitting at 0 keeps the rule accurate for statistics with a kink there (``|z|^p``).

    :returns: ``(points, weights)``, each of shape ``mean.shape + (2 size,)``.
    """
    nodes, node_weights = np.polynomial.legendre.leggauss(size)
    nodes = torch.as_tensor(nodes, dtype=mean.dtype, device=mean.device)
    node_weights = torch.as_tensor(node_weights, dtype=mean.dtype, device=mean.device)
    low, high = (mean - width * scale).unsqueeze(-1), (mean + width * scale).unsqueeze(-1)
    zero = torch.zeros_like(low)
    ends = [(torch.minimum(low, zero), torch.minimum(high, zero)), (torch.maximum(low, zero), torch.maximum(high, zero))]
    points, weights = [], []
    for start, stop in ends:
        half = 0.5 * (stop - start)
        point = start + half * (nodes + 1)
        standard = (point - mean.unsqueeze(-1)) / scale.unsqueeze(-1)
        density = torch.exp(-0.5 * standard.square()) / (scale.unsqueeze(-1) * _SQRT_2PI)
        points.append(point)
        weights.append(half * node_weights * density)
    return torch.cat(points, -1), torch.cat(weights, -1)


def registered_priors():
    """The names of the registered priors (built-in and defined by the user)."""
    return tuple(sorted(_REGISTRY))


def get_prior(prior, **config):
    """A :class:`Prior` from a name (``"laplace"``, ``"gaussian"``, or a registered subclass's ``name``)
    and its settings, or the prior itself.

    :raises ValueError: for an unknown name, naming the registered ones.
    """
    if isinstance(prior, Prior):
        if config:
            raise ValueError(f"settings {sorted(config)} apply to a prior given by name, not to {prior!r}")
        return prior
    if isinstance(prior, str) and prior in _REGISTRY:
        try:
            return _REGISTRY[prior](**config)
        except TypeError as error:
            raise ValueError(f"prior {prior!r} does not take the settings {config}: {error}") from None
    raise ValueError(f"prior must be a pyro_esc.priors.Prior or one of {registered_priors()}, got {prior!r}; "
                     f"a new prior subclasses pyro_esc.priors.Prior with a name (docs/guide/extending.md, 'Adding a prior')")
