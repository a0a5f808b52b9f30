"""Closed-form objectives for :class:`~pyro_esc.SparseCoding` with Gaussian guides.

Both objectives follow Pyro's convention: the loss is minus the sum over data
points of the per-point ELBO, i.e. -N F, so values are directly comparable
with :class:`pyro.infer.Trace_ELBO` on the same model and guide.

- :class:`EntropyELBO` is the entropy-based objective L_H of PAPER.md s.5, in
  which lambda and sigma^2 are eliminated at their optimum (Theorem 2).
- :class:`AnalyticELBO` is the standard ELBO F in closed form at the model's
  current lambda and sigma^2 (PAPER.md s.2 and s.6).

Neither draws a sample; both read the guide through the protocol of
:mod:`pyro_esc.posterior`.
"""

import math
import weakref
from typing import NamedTuple

import torch

from pyro.infer import ELBO

from .annealing import Annealing
from .gaussian import (
    expected_squared_error,
    expected_squared_errors,
    folded_normal_mean,
    isotropic_normal_entropy,
    laplace_entropy,
)
from .model import SparseCoding
from .posterior import gaussian_posterior

_LOG_2PI = math.log(2 * math.pi)
_LOG_2 = math.log(2.0)


class NonFiniteObjectiveError(FloatingPointError):
    """Raised when an objective evaluates to NaN or inf; the message names the term."""


class BatchStatistics(NamedTuple):
    """Expected sufficient statistics of the B data points of one evaluation.

    ``abs_sum`` and ``sq_error_sum`` determine Theorem 2's optimal scales::

        lambda_h* = 1/B     sum_n E_q[|z_h|]
        sigma^2*  = 1/(B D) sum_n E_q[||x^(n) - W z||^2]
    """

    num_data: int  #: N, the size of the full data set (the loss is scaled to it)
    num_points: int  #: B, the points in this batch
    data_dim: int  #: D
    entropy: torch.Tensor  #: sum_n H[q^(n)] over the batch (the joint entropy for joint guides)
    abs_sum: torch.Tensor  #: sum_n E|z^(n)|, shape (H,)
    sq_error_sum: torch.Tensor  #: sum_n E||x^(n) - W z||^2

    @property
    def optimal_prior_scale(self):
        """Theorem 2's lambda* for this batch."""
        return self.abs_sum / self.num_points

    @property
    def optimal_noise_var(self):
        """Theorem 2's sigma^2* for this batch."""
        return self.sq_error_sum / (self.num_points * self.data_dim)


def _read_posterior(model, guide, args, kwargs):
    # The common first half of every closed-form evaluation.
    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding (or subclass) for the closed-form "
                         f"objectives, got {type(model).__name__}")
    x, subsample = model.resolve_data(*args, **kwargs)
    posterior = gaussian_posterior(guide, x, subsample)
    x_batch = x if subsample is None else x.index_select(0, subsample)
    if tuple(posterior.mean.shape) != (x_batch.size(0), model.n_latents):
        raise ValueError(f"the guide's posterior has shape {tuple(posterior.mean.shape)}, expected "
                         f"(B, H) = ({x_batch.size(0)}, {model.n_latents})")
    return x, subsample, x_batch, posterior, model.read_dictionary()


def _summed_statistics(num_data, x_batch, posterior, dictionary):
    abs_sum = folded_normal_mean(posterior.mean, posterior.stddev).sum(0)
    trace_term = posterior.trace_term(dictionary)
    sq_error_sum = expected_squared_error(x_batch, dictionary, posterior.mean, trace_term)
    return BatchStatistics(num_data, x_batch.size(0), x_batch.size(1), posterior.entropy, abs_sum, sq_error_sum)


def batch_statistics(model, guide, *args, **kwargs):
    """Compute :class:`BatchStatistics` for ``model(*args, **kwargs)`` under ``guide``.

    Reads the dictionary inside the model's Pyro context (so SVI trains it) and
    the guide through :func:`~pyro_esc.posterior.gaussian_posterior`.
    """
    x, _, x_batch, posterior, dictionary = _read_posterior(model, guide, args, kwargs)
    return _summed_statistics(x.size(0), x_batch, posterior, dictionary)


class PointStatistics(NamedTuple):
    """Per-point expected statistics: entropy (B,), E|z| (B, H), E||x - W z||^2 (B,)."""

    entropy: torch.Tensor
    abs_mean: torch.Tensor
    sq_error: torch.Tensor

    @classmethod
    def of(cls, x_batch, posterior, dictionary):
        return cls(posterior.point_entropies(),
                   folded_normal_mean(posterior.mean, posterior.stddev),
                   expected_squared_errors(x_batch, dictionary, posterior.mean, posterior.trace_terms(dictionary)))


class RunningStatistics:
    """Whole-data-set sufficient statistics for minibatch training, kept current from the batches.

    It caches, for every data point n, H[q^(n)], E|z^(n)| and E||x^(n) - W z||^2
    as last computed (the batch points with the current guide and dictionary,
    the others as of their last visit; a full pass initialises the cache). The
    objective then uses the whole data set::

        S = sum_{n in batch} s_n(current) + sum_{n not in batch} s_n(cached)
        lambda* = S_|z| / N,  sigma^2* = S_sq / (N D),  L_H = S_H / N - ...

    The value is the full-data L_H up to staleness; the gradient flows through
    the batch points only, scaled by N / B as in Pyro's subsampling, so it is
    an unbiased estimate of the full gradient at the cached statistics. With
    the batch equal to the data set it is exactly full-batch EntropyELBO.
    """

    def __init__(self, x, points):
        self.num_data = x.size(0)
        self.data_dim = x.size(1)
        self._data = weakref.ref(x)
        self.entropy = points.entropy.detach().clone()
        self.abs_mean = points.abs_mean.detach().clone()
        self.sq_error = points.sq_error.detach().clone()

    @classmethod
    def from_state(cls, x, state):
        """Rebuild the cache for data ``x`` from :meth:`state_dict` (no pass over the data)."""
        like = dict(dtype=x.dtype, device=x.device)
        points = PointStatistics(state["entropy"].to(**like), state["abs_mean"].to(**like),
                                 state["sq_error"].to(**like))
        if points.entropy.shape != (x.size(0),):
            raise ValueError(f"running statistics are for {points.entropy.size(0)} points, x has {x.size(0)}")
        return cls(x, points)

    def matches(self, x):
        """Whether this cache belongs to the data tensor ``x``."""
        return self._data() is x

    def combine(self, subsample, points):
        """:class:`BatchStatistics` over all N points, with gradients from the batch only."""
        gain = self.num_data / subsample.size(0)

        def mix(cached, current):
            current_sum = current.sum(0)
            # Value: cached total with the batch rows replaced. Gradient: the batch's, times N / B.
            others = cached.sum(0) - cached.index_select(0, subsample).sum(0)
            return others + current_sum * gain - (current_sum * (gain - 1)).detach()

        statistics = BatchStatistics(self.num_data, self.num_data, self.data_dim,
                                     mix(self.entropy, points.entropy), mix(self.abs_mean, points.abs_mean),
                                     mix(self.sq_error, points.sq_error))
        with torch.no_grad():
            self.entropy[subsample] = points.entropy
            self.abs_mean[subsample] = points.abs_mean
            self.sq_error[subsample] = points.sq_error
        return statistics

    def state_dict(self):
        return {"entropy": self.entropy, "abs_mean": self.abs_mean, "sq_error": self.sq_error}



class EntropyTerms(NamedTuple):
    """The three entropies of Theorem 1 at Theorem 2's scales, per data point.

    ``elbo`` = L_H = posterior_entropy - prior_entropy - likelihood_entropy.
    """

    posterior_entropy: torch.Tensor  #: 1/N sum_n H[q^(n)] (estimated from the batch)
    prior_entropy: torch.Tensor  #: H[p(z)] = sum_h log(2 e lambda_h*)
    likelihood_entropy: torch.Tensor  #: E[H[p(x|z)]] = D/2 log(2 pi e sigma^2*)
    prior_scale: torch.Tensor  #: lambda*
    noise_var: torch.Tensor  #: sigma^2*
    num_data: int  #: N

    @property
    def elbo(self):
        """L_H, the ELBO per data point at the optimal scales."""
        return self.posterior_entropy - self.prior_entropy - self.likelihood_entropy

    def weighted_elbo(self, beta_q=1.0, beta_p=1.0, beta_x=1.0):
        """beta_q H[q] - beta_p H[p(z)] - beta_x H[p(x|z)] (PAPER.md s.7; all ones give ``elbo``)."""
        return beta_q * self.posterior_entropy - beta_p * self.prior_entropy - beta_x * self.likelihood_entropy

    def check_finite(self, value=None):
        """Raise :class:`NonFiniteObjectiveError` naming every term that is NaN or inf.

        :param value: the objective computed from these terms, if at hand (saves recomputing it).
        """
        if bool(torch.isfinite(self.elbo if value is None else value)):
            return
        bad = [name for name in ("posterior_entropy", "prior_entropy", "likelihood_entropy")
               if not bool(torch.isfinite(getattr(self, name)))]
        raise NonFiniteObjectiveError(
            f"EntropyELBO is not finite: term(s) {', '.join(bad)} = "
            + ", ".join(f"{float(getattr(self, name).detach()):g}" for name in bad)
            + f" (lambda* in [{float(self.prior_scale.detach().min()):g}, {float(self.prior_scale.detach().max()):g}], "
            f"sigma^2* = {float(self.noise_var.detach()):g})")


def entropy_terms(statistics):
    """:class:`EntropyTerms` from :class:`BatchStatistics` (Theorems 1 and 2)."""
    prior_scale = statistics.optimal_prior_scale
    noise_var = statistics.optimal_noise_var
    return EntropyTerms(
        posterior_entropy=statistics.entropy / statistics.num_points,
        prior_entropy=laplace_entropy(prior_scale),
        likelihood_entropy=isotropic_normal_entropy(noise_var, statistics.data_dim),
        prior_scale=prior_scale,
        noise_var=noise_var,
        num_data=statistics.num_data,
    )


class EntropyELBO(ELBO):
    r"""The entropy-based ELBO with lambda and sigma^2 eliminated in closed form.

    At the stationary point of the ELBO in lambda and sigma^2 (Theorem 1) the
    ELBO is a sum of entropies, and that point is closed form (Theorem 2)::

        lambda_h* = 1/N     sum_n E_q[|z_h|]
        sigma^2*  = 1/(N D) sum_n E_q[||x^(n) - W z||^2]

        L_H = 1/N sum_n H[q^(n)] - sum_h log(2 e lambda_h*) - D/2 log(2 pi e sigma^2*)

    For Gaussian guides every term is analytic (PAPER.md s.6), so the objective
    and its gradients are deterministic. By the envelope argument (PAPER.md
    s.5) the gradients with respect to the guide and the dictionary equal those
    of the standard ELBO at lambda*, sigma^2*, so maximising L_H maximises the
    ELBO with the scales always at their optimum.

    ``loss``, ``differentiable_loss`` and ``loss_and_grads`` return -N L_H
    (Pyro's sign and scale). After every evaluation the model's
    ``prior_scale`` and ``noise_var`` are set to lambda*, sigma^2*, so the
    model always holds the optimal scales for the current guide and other
    ELBOs (e.g. Trace_ELBO) evaluate the same point. The scales are set, not
    optimised: they are written directly, not through ``pyro.param``, and so
    stay out of SVI's parameter capture and optimiser.

    **Minibatches** (``subsample`` / ``subsample_size`` in the model's
    arguments): with ``minibatch_statistics="running"`` (default) lambda*,
    sigma^2* and the entropy average come from whole-data-set statistics kept
    current from the batches (:class:`RunningStatistics`; the first
    subsampled call makes one full pass without gradients). With ``"batch"``
    they are estimated from the batch alone and the loss is scaled by N / B.

    **Annealing** (PAPER.md s.7): with ``annealing``, an
    :class:`~pyro_esc.annealing.Annealing`, the optimised objective is
    beta_q H[q] - beta_p H[p(z)] - beta_x H[p(x|z)] at the current training
    step. ``differentiable_loss`` returns that weighted loss (it is what is
    optimised); ``loss`` and ``loss_and_grads`` always return the true,
    unweighted -N L_H. ``step`` counts ``loss_and_grads`` calls (training
    steps) and drives the schedule; ``betas`` holds the last weights used.

    :param annealing: optional :class:`~pyro_esc.annealing.Annealing`.
    :param str minibatch_statistics: ``"running"`` or ``"batch"`` (see above).

    Reference: D. Velychko, S. Damm, A. Fischer, J. Lücke, "Learning Sparse
    Codes with Entropy-Based ELBOs", AISTATS 2024.
    """

    def __init__(self, annealing=None, minibatch_statistics="running"):
        super().__init__(num_particles=1)
        if annealing is not None and not isinstance(annealing, Annealing):
            raise ValueError(f"annealing must be a pyro_esc.annealing.Annealing or None, got {annealing!r}")
        if minibatch_statistics not in ("running", "batch"):
            raise ValueError(f"minibatch_statistics must be 'running' or 'batch', got {minibatch_statistics!r}")
        self.annealing = annealing
        self.minibatch_statistics = minibatch_statistics
        self.step = 0
        self.betas = (1.0, 1.0, 1.0)
        self.running = None

    def terms(self, model, guide, *args, **kwargs):
        """The :class:`EntropyTerms` at the current guide and dictionary (differentiable)."""
        x, subsample, x_batch, posterior, dictionary = _read_posterior(model, guide, args, kwargs)
        if subsample is None or self.minibatch_statistics == "batch":
            return entropy_terms(_summed_statistics(x.size(0), x_batch, posterior, dictionary))
        if posterior.is_joint:
            raise ValueError("running minibatch statistics need per-point posteriors; this guide is joint")
        if self.running is None or not self.running.matches(x):
            with torch.no_grad():
                full = gaussian_posterior(guide, x, None)
                self.running = RunningStatistics(x, PointStatistics.of(x, full, dictionary))
        return entropy_terms(self.running.combine(subsample, PointStatistics.of(x_batch, posterior, dictionary)))

    def _losses(self, model, guide, args, kwargs):
        terms = self.terms(model, guide, *args, **kwargs)
        loss = -terms.num_data * terms.elbo
        terms.check_finite(loss)
        model.assign_scales(terms.prior_scale.detach(), terms.noise_var.detach())
        self.betas = (1.0, 1.0, 1.0) if self.annealing is None else self.annealing.betas(self.step)
        if self.betas == (1.0, 1.0, 1.0):
            return loss, loss
        return loss, -terms.num_data * terms.weighted_elbo(*self.betas)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The optimised loss as a differentiable tensor: -N L_H, or its annealed version.

        Also sets the model's scales to lambda*, sigma^2*.
        """
        return self._losses(model, guide, args, kwargs)[1]

    def loss(self, model, guide, *args, **kwargs):
        """-N L_H as a float (never annealed)."""
        with torch.no_grad():
            return float(self._losses(model, guide, args, kwargs)[0])

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """-N L_H as a float; backpropagates the optimised (possibly annealed) loss; counts a step."""
        loss, optimised = self._losses(model, guide, args, kwargs)
        optimised.backward(retain_graph=self.retain_graph)
        self.step += 1
        return loss.item()

    def state_dict(self):
        """Step counter and running statistics, for checkpoints."""
        return {"step": self.step, "running": None if self.running is None else self.running.state_dict()}

    def load_state_dict(self, state, x=None):
        """Restore :meth:`state_dict`; running statistics are re-attached to the data ``x``."""
        self.step = int(state["step"])
        self.running = None
        if state["running"] is not None:
            if x is None:
                raise ValueError("restoring running statistics needs the data x they belong to")
            self.running = RunningStatistics.from_state(x, state["running"])

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("EntropyELBO is closed form: it draws no traces")


class AnalyticELBO(ELBO):
    r"""The standard ELBO in closed form, at the model's current lambda and sigma^2.

    For Gaussian q^(n) (PAPER.md s.2, s.6), summing over data points::

        F_n = E_q[log p(x^(n)|z)] + E_q[log p(z)] + H[q^(n)]
            = - D/2 log(2 pi sigma^2) - E||x^(n) - W z||^2 / (2 sigma^2)
              - sum_h [ log(2 lambda_h) + E|z_h| / lambda_h ] + H[q^(n)]

    The loss is -sum_n F_n (scaled by N / B for minibatches), like Pyro's
    ``Trace_ELBO`` but exact. lambda and sigma^2 are read inside the model's
    Pyro context, so SVI learns them by gradient. At Theorem 2's lambda*,
    sigma^2* it equals :class:`EntropyELBO` exactly.
    """

    def __init__(self):
        super().__init__(num_particles=1)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """-sum_n F_n as a differentiable tensor."""
        stats = batch_statistics(model, guide, *args, **kwargs)
        prior_scale, noise_var = model.read_scales()
        batch, dim = stats.num_points, stats.data_dim
        elbo_sum = (stats.entropy
                    - 0.5 * batch * dim * (_LOG_2PI + noise_var.log())
                    - stats.sq_error_sum / (2 * noise_var)
                    - batch * (_LOG_2 + prior_scale.log()).sum()
                    - (stats.abs_sum / prior_scale).sum())
        loss = -(stats.num_data / batch) * elbo_sum
        if not bool(torch.isfinite(loss)):
            raise NonFiniteObjectiveError(
                f"AnalyticELBO is not finite (entropy {float(stats.entropy):g}, squared error "
                f"{float(stats.sq_error_sum):g}, sigma^2 {float(noise_var):g}, "
                f"lambda in [{float(prior_scale.min()):g}, {float(prior_scale.max()):g}])")
        return loss

    def loss(self, model, guide, *args, **kwargs):
        """-sum_n F_n as a float."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """-sum_n F_n as a float; also backpropagates it into the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("AnalyticELBO is closed form: it draws no traces")
