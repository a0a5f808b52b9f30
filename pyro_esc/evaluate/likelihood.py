"""Importance-sampled log-likelihood log p(x) of :class:`~pyro_esc.SparseCoding`.

The guide's per-point Gaussian q(z | x^(n)) is the proposal. With K draws
z_k ~ q and weights w_k = p(x^(n), z_k) / q(z_k)::

    log p(x^(n)) ~= log (1/K sum_k w_k)

is the importance-weighted bound of Burda, Grosse and Salakhutdinov (2016): its
expectation lies between the ELBO (K = 1) and log p(x^(n)), and rises to
log p(x^(n)) as K grows.
"""

import contextlib
import math
from typing import NamedTuple

import torch
from tqdm.auto import tqdm


from .._checks import check_int, check_subsample
from .._pyro_internals import own_parameters
from ..distributions.gaussian import normal_log_normalizer
from ..models.sparse_coding import SparseCoding
from ..variational.posterior import gaussian_posterior


class LogLikelihood(NamedTuple):
    """Importance-sampled estimates of log p(x^(n)), as returned by :func:`log_likelihood`.

    Example::

        >>> from pyro_esc import LogLikelihood
        >>> LogLikelihood._fields[:4]                      # what log_likelihood returns (see its example)
        ('per_point', 'standard_error', 'effective_sample_size', 'num_samples')

    """

    per_point: torch.Tensor  #: log p(x^(n)) estimates, shape (B,)
    standard_error: torch.Tensor  #: their standard errors (delta method), shape (B,)
    effective_sample_size: torch.Tensor  #: (sum w)^2 / sum w^2 per point, in [1, K], shape (B,)
    num_samples: int  #: K, importance samples per point

    @property
    def total(self):
        """sum_n log p(x^(n)), a scalar."""
        return self.per_point.sum()

    @property
    def total_standard_error(self):
        """Standard error of :attr:`total` (points are estimated independently)."""
        return self.standard_error.square().sum().sqrt()

    @property
    def mean(self):
        """The average log p(x^(n)) per data point."""
        return self.per_point.mean()


def log_likelihood(model, guide, x, num_samples=1000, subsample=None, batch_size=256, sample_batch_size=256,
                   seed=None, progress=True):
    """Estimate log p(x^(n)) per data point by importance sampling with the guide as proposal.

    ::

        log p(x_n) ~= logsumexp_k [log p(x_n, z_k) - log q(z_k | x_n)] - log K,   z_k ~ q(z | x_n)

    The proposal is the guide's per-point Gaussian read through
    :func:`~pyro_esc.posterior.gaussian_posterior`; guides that are one
    Gaussian over all points jointly (AutoMultivariateNormal) have no per-point
    proposal and are rejected. The standard error is the delta-method one of a
    log-mean::

        se_n = std_k(w_k) / (sqrt(K) mean_k(w_k))

    computed stably from the log-weights. It is reliable only when the weights
    are well behaved, i.e. the effective sample size (sum w)^2 / sum w^2 is a
    sizeable fraction of K; with heavy-tailed weights (a proposal narrower than
    the posterior) it underestimates the error. The estimate is biased low by
    about se_n^2 / 2 (Jensen's inequality) and never exceeds log p(x_n) in
    expectation.

    Work is split into blocks of ``batch_size`` points and ``sample_batch_size``
    draws, so memory is O(batch_size * sample_batch_size * (D + H)) whatever
    ``num_samples`` is. No gradients are recorded.

    Example::

        >>> import pyro
        >>> from pyro_esc import LocalMultivariateNormal, SparseCoding, fit, held_out_elbo, log_likelihood
        >>> from pyro_esc.data import bars
        >>> pyro.clear_param_store()
        >>> x, _ = bars(100, seed=0)
        >>> model = SparseCoding(25, 10)
        >>> guide = LocalMultivariateNormal(model)
        >>> history = fit(model, guide, x, progress=False)
        >>> estimate = log_likelihood(model, guide, x, num_samples=200, seed=0, progress=False)
        >>> float(estimate.per_point.mean()) >= held_out_elbo(model, guide, x)    # log p(x) >= ELBO
        True
        >>> tuple(estimate.per_point.shape), estimate.num_samples
        ((100,), 200)

    :param model: a :class:`~pyro_esc.SparseCoding` (its current lambda, W, sigma^2 are used).
    :param guide: a Gaussian guide for the model (see :mod:`pyro_esc.posterior`).
    :param torch.Tensor x: all N data points, shape (N, D), as passed to the model.
    :param int num_samples: K, importance samples per data point (at least 2).
    :param torch.Tensor subsample: optional indices of the points to evaluate (default all).
    :param int batch_size: data points per block.
    :param int sample_batch_size: importance samples per block.
    :param int seed: if given, draws use this seed and the global RNG is left untouched;
        otherwise they come from torch's global RNG (``pyro.set_rng_seed``).
    :param bool progress: show a tqdm progress bar over the blocks.
    :rtype: LogLikelihood
    """
    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding, got {type(model).__name__}")
    num_samples = check_int(num_samples, "num_samples", minimum=2)
    batch_size = check_int(batch_size, "batch_size")
    sample_batch_size = check_int(sample_batch_size, "sample_batch_size")
    if seed is not None:
        seed = check_int(seed, "seed", minimum=0)
    x, _ = model.resolve_data(x)
    subsample = check_subsample(subsample, x.size(0))
    points = torch.arange(x.size(0), device=x.device) if subsample is None else subsample

    # The model's and the guide's own parameters, whatever the current param store holds under their names.
    with torch.no_grad(), seeded(seed, x.device), own_parameters(model, guide):
        dictionary = model.read_dictionary().detach()
        prior_scale, noise_var = (value.detach() for value in model.read_scales())
        prior = model.prior.distribution(prior_scale).to_event(1)
        blocks = [points[start:start + batch_size] for start in range(0, points.numel(), batch_size)]
        sample_blocks = [min(sample_batch_size, num_samples - start) for start in range(0, num_samples, sample_batch_size)]
        estimates, errors, sizes = [], [], []
        with tqdm(total=len(blocks) * len(sample_blocks), disable=not progress, desc="log p(x)",
                  dynamic_ncols=True, leave=False) as bar:
            for block in blocks:
                proposal = _proposal(guide, x, block)
                x_block = x.index_select(0, block)
                log_sum = log_sum_sq = None
                for size in sample_blocks:
                    z = proposal.sample((size,))  # (S, b, H)
                    log_weight = (prior.log_prob(z)
                                  + _log_likelihood_given_z(x_block, z, dictionary, noise_var)
                                  - proposal.log_prob(z))
                    log_sum = _log_add(log_sum, log_weight.logsumexp(0))
                    log_sum_sq = _log_add(log_sum_sq, (2 * log_weight).logsumexp(0))
                    bar.update()
                estimate, error, size = _summarise(log_sum, log_sum_sq, num_samples)
                estimates.append(estimate)
                errors.append(error)
                sizes.append(size)
    return LogLikelihood(torch.cat(estimates), torch.cat(errors), torch.cat(sizes), num_samples)


def _proposal(guide, x, block):
    whole = block.numel() == x.size(0) and bool((block == torch.arange(x.size(0), device=block.device)).all())
    posterior = gaussian_posterior(guide, x, None if whole else block)
    if posterior.is_joint:
        raise ValueError(f"guide {type(guide).__name__} is one Gaussian over all data points jointly and has "
                         f"no per-point proposal q(z | x_n); log_likelihood needs a per-point guide "
                         f"(AutoNormal, LocalMultivariateNormal, AmortizedNormal or a user guide)")
    return posterior.per_point_distribution()


def _log_likelihood_given_z(x, z, dictionary, noise_var):
    # log Normal(x; W z, sigma^2 I) summed over D, for z of shape (S, B, H) and x of shape (B, D).
    residual = x - z @ dictionary.T
    return normal_log_normalizer(noise_var, x.size(-1)) - residual.square().sum(-1) / (2 * noise_var)


def _log_add(total, value):
    return value if total is None else torch.logaddexp(total, value)


def _summarise(log_sum, log_sum_sq, num_samples):
    # From log sum w and log sum w^2: the log-mean, its delta-method standard error, the ESS.
    log_k = math.log(num_samples)
    estimate = log_sum - log_k
    # ratio = mean(w^2) / mean(w)^2 = K sum w^2 / (sum w)^2 >= 1; relative variance of w = ratio - 1.
    ratio = torch.exp(log_sum_sq + log_k - 2 * log_sum)
    relative_variance = (ratio - 1).clamp_min(0) * num_samples / (num_samples - 1)
    error = (relative_variance / num_samples).sqrt()
    effective_sample_size = torch.exp(2 * log_sum - log_sum_sq)
    return estimate, error, effective_sample_size


@contextlib.contextmanager
def seeded(seed, device):
    """Within the block, draw from torch's RNG seeded with ``seed``; restore the caller's RNG after.

    With ``seed=None`` nothing changes (the global RNG is used and advanced).
    """
    if seed is None:
        yield
        return
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
