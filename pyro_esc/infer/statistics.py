"""Expected sufficient statistics of a Gaussian guide under :class:`~pyro_esc.SparseCoding`.

The closed-form objectives depend on the guide and the dictionary only through
three sums over data points (Theorem 2 and the Gaussian closed forms of :mod:`pyro_esc.gaussian`)::

    S_H   = sum_n H[q^(n)]                  (posterior entropy)
    S_phi = sum_n E_q[phi(z^(n))]           (shape (H,); the prior's statistic, e.g. |z| for Laplace:
                                             gives its optimal scale, lambda* = S_phi / N for Laplace)
    S_sq  = sum_n E_q||x^(n) - W z||^2      (gives sigma^2* = S_sq / (N D))

The statistic phi and the optimal scale come from the model's prior (:mod:`pyro_esc.priors`).

- :func:`read_posterior` reads the guide and the dictionary for one evaluation
  (inside the model's Pyro context, so SVI trains the dictionary) and rejects
  what a closed-form objective cannot honour;
- :class:`BatchStatistics` holds the three sums of one evaluation;
- :class:`PointStatistics` holds them per point, for minibatches;
- :class:`RunningStatistics` is the per-point table of the whole data set that
  minibatch training keeps, with one writer (:meth:`RunningStatistics.store`).
"""

import weakref
from typing import NamedTuple

import torch

from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.seed_messenger import SeedMessenger
from pyro.poutine.trace_messenger import TraceMessenger

from .._pyro_internals import active_handlers
from ..distributions.gaussian import expected_squared_error, expected_squared_errors
from ..models.sparse_coding import SparseCoding
from ..variational.posterior import gaussian_posterior

# Handlers that may be active around a closed-form objective: they record or
# hide sites (SVI's parameter capture is a TraceMessenger) or seed the RNG, and
# change no density. Any other handler (scale, mask, condition, lift, plate,
# ...) would change what the model means, and the closed form cannot honour it.
_HARMLESS_HANDLERS = (TraceMessenger, BlockMessenger, SeedMessenger)


class Evaluation(NamedTuple):
    """What one closed-form evaluation reads: the data, the batch and the guide's Gaussian summary."""

    x: torch.Tensor  #: all N data points
    subsample: torch.Tensor  #: the batch's indices, or None for the whole data set
    x_batch: torch.Tensor  #: the batch's data points (B, D)
    posterior: object  #: the guide's :class:`~pyro_esc.GaussianPosterior` for the batch
    dictionary: torch.Tensor  #: W (D, H), read inside the model's Pyro context


def read_posterior(model, guide, args, kwargs, objective="the closed-form objective", posterior=None):
    """Resolve the model's arguments and read the guide's Gaussian summary and the dictionary.

    Raises a ValueError for a model the closed form does not describe (not a
    :class:`~pyro_esc.SparseCoding`, or a subclass that overrides ``forward``)
    and for effect handlers active around the call that would change the model's
    density (e.g. ``poutine.scale``): the closed form never runs the model, so it
    would silently ignore them.

    :param posterior: the batch's :class:`~pyro_esc.GaussianPosterior` given as an argument (the
        row-wise route builds it from the rows it optimises, :func:`~pyro_esc.rows.rows_posterior`);
        None reads it from the guide.
    """
    check_closed_form_model(model, objective)
    x, subsample = model.resolve_data(*args, **kwargs)
    if posterior is None:
        posterior = gaussian_posterior(guide, x, subsample)
    x_batch = x if subsample is None else x.index_select(0, subsample)
    if tuple(posterior.mean.shape) != (x_batch.size(0), model.n_latents):
        raise ValueError(f"the guide's posterior has shape {tuple(posterior.mean.shape)}, expected "
                         f"(B, H) = ({x_batch.size(0)}, {model.n_latents})")
    return Evaluation(x, subsample, x_batch, posterior, model.read_dictionary())


def check_closed_form_model(model, objective="the closed-form objective"):
    """A ValueError unless the closed form describes ``model`` here: see :func:`read_posterior`."""
    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding (not wrapped in effect handlers) for "
                         f"{objective}, got {type(model).__name__}; use Trace_ELBO for other models")
    if type(model).forward is not SparseCoding.forward:
        raise ValueError(f"{type(model).__name__} overrides SparseCoding.forward, but {objective} computes "
                         f"SparseCoding's own density in closed form and never runs the model, so it would "
                         f"ignore the change; use Trace_ELBO for a changed model")
    foreign = [type(handler).__name__ for handler in active_handlers()
               if not isinstance(handler, _HARMLESS_HANDLERS)]
    if foreign:
        raise ValueError(f"{objective} computes the model's density in closed form and cannot honour the "
                         f"effect handlers active around it ({', '.join(foreign)}, e.g. poutine.scale, "
                         f"poutine.mask or a plate); call it outside them, or use Trace_ELBO")


class BatchStatistics(NamedTuple):
    """Expected sufficient statistics of the B data points of one evaluation.

    ``statistic_sum`` and ``sq_error_sum`` determine Theorem 2's optimal scales::

        s_h*     = prior.optimal_scale(1/B sum_n E_q[phi(z_h)])   (lambda_h* = 1/B sum_n E_q|z_h| for Laplace)
        sigma^2* = 1/(B D) sum_n E_q[||x^(n) - W z||^2]
    """

    num_data: int  #: N, the size of the full data set (the loss is scaled to it)
    num_points: int  #: B, the points in this batch
    data_dim: int  #: D
    entropy: torch.Tensor  #: sum_n H[q^(n)] over the batch (the joint entropy for joint guides)
    statistic_sum: torch.Tensor  #: sum_n E_q[phi(z^(n))], the prior's statistic, shape (H,)
    sq_error_sum: torch.Tensor  #: sum_n E||x^(n) - W z||^2

    @classmethod
    def of(cls, evaluation, prior):
        """The sums over the batch of an :class:`Evaluation` under ``prior`` (a :class:`~pyro_esc.priors.Prior`)."""
        posterior, x_batch, dictionary = evaluation.posterior, evaluation.x_batch, evaluation.dictionary
        statistic_sum = prior.expected_statistic(posterior.mean, posterior.stddev).sum(0)
        sq_error_sum = expected_squared_error(x_batch, dictionary, posterior.mean, posterior.trace_term(dictionary))
        return cls(evaluation.x.size(0), x_batch.size(0), x_batch.size(1), posterior.entropy, statistic_sum,
                   sq_error_sum)

    def optimal_prior_scale(self, prior):
        """Theorem 2's optimal prior scale for this batch (lambda* = mean E|z| for Laplace)."""
        return prior.optimal_scale(self.statistic_sum / self.num_points)

    @property
    def optimal_noise_var(self):
        """Theorem 2's sigma^2* for this batch."""
        return self.sq_error_sum / (self.num_points * self.data_dim)


def batch_statistics(model, guide, *args, posterior=None, **kwargs):
    """Compute :class:`BatchStatistics` for ``model(*args, **kwargs)`` under ``guide``.

    Reads the dictionary inside the model's Pyro context (so SVI trains it) and
    the guide through :func:`~pyro_esc.posterior.gaussian_posterior`, or takes the
    batch's ``posterior`` as given (see :func:`read_posterior`).
    """
    return BatchStatistics.of(read_posterior(model, guide, args, kwargs, posterior=posterior), model.prior)


class PointStatistics(NamedTuple):
    """Per-point expected statistics: entropy (B,), E_q[phi(z)] (B, H), E||x - W z||^2 (B,)."""

    entropy: torch.Tensor
    statistic: torch.Tensor
    sq_error: torch.Tensor

    @classmethod
    def of(cls, x_batch, posterior, dictionary, prior):
        return cls(posterior.point_entropies(),
                   prior.expected_statistic(posterior.mean, posterior.stddev),
                   expected_squared_errors(x_batch, dictionary, posterior.mean, posterior.trace_terms(dictionary)))


def _reference(value):
    # A weak reference where the object allows one (so a table never keeps a model,
    # guide or data set alive); otherwise a strong one.
    try:
        return weakref.ref(value)
    except TypeError:
        return lambda: value


class RunningStatistics:
    """The per-point statistics of a whole data set, kept for minibatch training.

    For every data point n it holds H[q^(n)], E_q[phi(z^(n))] and E||x^(n) - W z||^2
    as last stored. A minibatch evaluation (:meth:`combine`) uses the current
    values for the batch and the stored ones for every other point::

        S = sum_{n in batch} s_n(current) + sum_{n not in batch} s_n(stored)
        s* = prior.optimal_scale(S_phi / N),  sigma^2* = S_sq / (N D),  L_H = S_H / N - ...

    Its value is the full-data L_H up to the staleness of the stored rows; its
    gradient flows through the batch only, scaled by N / B as in Pyro's
    subsampling. With the batch equal to the data set it is exactly the
    full-batch objective.

    **Cost O(batch)**: the sums over all N rows are kept as running totals (in
    float64, whatever the data's dtype), which :meth:`store` updates by
    subtracting the batch's old rows and adding the new ones, and
    :meth:`combine` reads without touching the other rows. Against drift, the
    totals are summed afresh from the table after every ``resum_every`` stored
    rows (default N: once an epoch, O(N) then, O(batch) per step on average).

    A table belongs to one model, one guide and one data tensor (in the version
    it had when the table was built): :meth:`belongs_to` checks all three, so a
    table can never serve another guide or changed data. Only :meth:`store`
    changes it; :meth:`combine` is pure.
    """

    def __init__(self, model, guide, x, points, resum_every=None):
        self.num_data = x.size(0)
        self.data_dim = x.size(1)
        self._model = _reference(model)
        self._guide = _reference(guide)
        self._data = weakref.ref(x)
        self._data_version = x._version
        self.entropy = points.entropy.detach().clone()
        self.statistic = points.statistic.detach().clone()
        self.sq_error = points.sq_error.detach().clone()
        self.resum_every = self.num_data if resum_every is None else int(resum_every)
        if self.resum_every < 1:
            raise ValueError(f"resum_every must be >= 1 stored rows, got {resum_every!r}")
        self._resum()

    @torch.no_grad()
    def _resum(self):
        # Running totals (float64) of each column of the table, and rows stored since they were exact.
        self._totals = [column.double().sum(0) for column in (self.entropy, self.statistic, self.sq_error)]
        self._stored_since_resum = 0

    def belongs_to(self, model, guide, x):
        """Whether this table was built for this model, this guide and this (unchanged) data tensor."""
        return (self._model() is model and self._guide() is guide and self._data() is x
                and x._version == self._data_version)

    def combine(self, subsample, points):
        """:class:`BatchStatistics` over all N points, with gradients from the batch only (pure, O(batch))."""
        gain = self.num_data / subsample.size(0)

        def mix(total, stored, current):
            current_sum = current.sum(0)
            # Value: the stored total with the batch rows replaced. Gradient: the batch's, times N / B.
            others = (total - stored.index_select(0, subsample).double().sum(0)).to(current.dtype)
            return others + current_sum * gain - (current_sum * (gain - 1)).detach()

        entropy, statistic_sum, sq_error = (mix(total, stored, current) for total, stored, current in
                                            zip(self._totals, (self.entropy, self.statistic, self.sq_error), points))
        return BatchStatistics(self.num_data, self.num_data, self.data_dim, entropy, statistic_sum, sq_error)

    def totals(self):
        """:class:`BatchStatistics` of the stored table itself (no gradient; O(H))."""
        entropy, statistic_sum, sq_error = (total.to(self.entropy.dtype) for total in self._totals)
        return BatchStatistics(self.num_data, self.num_data, self.data_dim, entropy, statistic_sum, sq_error)

    @torch.no_grad()
    def store(self, subsample, points):
        """Overwrite the rows ``subsample`` (all rows for None) with ``points``: the table's one writer."""
        columns = (self.entropy, self.statistic, self.sq_error)
        if subsample is None:
            for column, new in zip(columns, points):
                column.copy_(new.detach())
            self._resum()
            return
        for total, column, new in zip(self._totals, columns, points):
            new = new.detach()
            total += new.double().sum(0) - column.index_select(0, subsample).double().sum(0)
            column.index_copy_(0, subsample, new)
        self._stored_since_resum += subsample.size(0)
        if self._stored_since_resum >= self.resum_every:
            self._resum()

    def state_dict(self):
        return {"entropy": self.entropy, "statistic": self.statistic, "sq_error": self.sq_error}

    @classmethod
    def from_state(cls, model, guide, x, state):
        """Rebuild a table for ``(model, guide, x)`` from :meth:`state_dict` (no pass over the data)."""
        like = dict(dtype=x.dtype, device=x.device)
        # "abs_mean": the statistic's name in checkpoints written before priors were pluggable.
        statistic = state["statistic"] if "statistic" in state else state["abs_mean"]
        points = PointStatistics(state["entropy"].to(**like), statistic.to(**like),
                                 state["sq_error"].to(**like))
        if points.entropy.shape != (x.size(0),):
            raise ValueError(f"running statistics are for {points.entropy.size(0)} points, x has {x.size(0)}")
        return cls(model, guide, x, points)


def check_distinct(subsample):
    """Reject repeated indices: a running table would count a repeated point twice."""
    if torch.unique(subsample).numel() != subsample.numel():
        raise ValueError("subsample must not repeat data points with running minibatch statistics "
                         "(each index at most once per batch)")
