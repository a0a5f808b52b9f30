"""Closed-form objectives for :class:`~pyro_esc.SparseCoding` with Gaussian guides.

Both objectives follow Pyro's convention: the loss is minus the sum over data
points of the per-point ELBO, i.e. -N F, so values are directly comparable
with :class:`pyro.infer.Trace_ELBO` on the same model and guide.

- :class:`EntropyELBO` is the entropy-based objective L_H (docs/theory.md, The entropy-based objective), in
  which lambda and sigma^2 are eliminated at their optimum (Theorem 2).
- :class:`AnalyticELBO` is the standard ELBO F in closed form at the model's
  current lambda and sigma^2 (docs/theory.md, The ELBO and Gaussian posteriors).

Neither draws a sample; both read the guide through the protocol of
:mod:`pyro_esc.posterior`.
"""

import warnings
from typing import NamedTuple, Optional

import torch

from pyro.infer import ELBO

from ..distributions.gaussian import isotropic_normal_entropy, normal_log_normalizer
from .annealing import Annealing
from .statistics import (  # noqa: F401 - BatchStatistics, batch_statistics, RunningStatistics: public here too
    BatchStatistics,
    PointStatistics,
    RunningStatistics,
    batch_statistics,
    check_closed_form_model,
    check_distinct,
    read_posterior,
)

class NonFiniteObjectiveError(FloatingPointError):
    """Raised when an objective evaluates to NaN or inf; the message names the term.

    Example::

        >>> from pyro_esc import NonFiniteObjectiveError
        >>> issubclass(NonFiniteObjectiveError, FloatingPointError)   # catch it as a floating-point error
        True

    """


class Evaluated(NamedTuple):
    """One evaluation of :class:`EntropyELBO` (:meth:`EntropyELBO.evaluate`)."""

    loss: torch.Tensor  #: -N L_H, never annealed (differentiable)
    optimised: torch.Tensor  #: the loss training minimises: the annealed one, else ``loss`` itself
    terms: "EntropyTerms"  #: the entropies and scales it was computed from
    points: Optional[PointStatistics]  #: the batch's rows for a running table (None without one)


class EntropyTerms(NamedTuple):
    """The three entropies of Theorem 1 at Theorem 2's scales, per data point.

    ``elbo`` = L_H = posterior_entropy - prior_entropy - likelihood_entropy.
    """

    posterior_entropy: torch.Tensor  #: 1/N sum_n H[q^(n)] (estimated from the batch)
    prior_entropy: torch.Tensor  #: H[p(z)] at the optimal scales (sum_h log(2 e lambda_h*) for Laplace)
    likelihood_entropy: torch.Tensor  #: E[H[p(x|z)]] = D/2 log(2 pi e sigma^2*)
    prior_scale: torch.Tensor  #: lambda*
    noise_var: torch.Tensor  #: sigma^2*
    num_data: int  #: N

    @property
    def elbo(self):
        """L_H, the ELBO per data point at the optimal scales."""
        return self.posterior_entropy - self.prior_entropy - self.likelihood_entropy

    def weighted_elbo(self, beta_q=1.0, beta_p=1.0, beta_x=1.0):
        """beta_q H[q] - beta_p H[p(z)] - beta_x H[p(x|z)] (docs/theory.md, Annealing; all ones give ``elbo``)."""
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
            f"sigma^2* = {float(self.noise_var.detach()):g})"
            + ("; sigma^2* <= 0 is rounding: E||x - W z||^2 is tiny beside the posterior covariances' terms, so the "
               "posteriors' scale is far from the data's. If the data are in unusual units, standardise them "
               "(divide by their standard deviation), or train in float64"
               if float(self.noise_var.detach()) <= 0 else ""))


def entropy_terms(statistics, prior):
    """:class:`EntropyTerms` from :class:`BatchStatistics` under ``prior`` (Theorems 1 and 2)."""
    prior_scale = statistics.optimal_prior_scale(prior)
    noise_var = statistics.optimal_noise_var
    return EntropyTerms(
        posterior_entropy=statistics.entropy / statistics.num_points,
        prior_entropy=prior.entropy(prior_scale),
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

    That is the Laplace prior. The same holds for any prior of :mod:`pyro_esc.priors` (the
    model's ``prior``): its scales s* are the closed-form optimum for the mean statistic
    E_q[phi(z)], and the prior term is its entropy H[p(z; s*)] (for the Gaussian prior,
    s_h*^2 = 1/N sum_n E_q[z_h^2] and the model is probabilistic PCA).

    For Gaussian guides every term is analytic (docs/theory.md, Gaussian posteriors), so
    the objective and its gradients are deterministic. By the envelope argument
    (docs/theory.md, The entropy-based objective) the gradients with respect to the guide and the dictionary equal those
    of the standard ELBO at lambda*, sigma^2*, so maximising L_H maximises the
    ELBO with the scales always at their optimum.

    **Two ways in.** The functional core is what :func:`~pyro_esc.fit` uses, NumPyro's
    way: :meth:`evaluate` is a pure function of (model, guide, data, state), and
    :meth:`commit` the one call that changes state (it writes lambda*, sigma^2* into
    the model, so that other ELBOs, e.g. Trace_ELBO or AnalyticELBO, evaluate the same
    point, and stores the batch's rows in the running statistics); the state, the
    running minibatch statistics of :meth:`init_statistics`, belongs to the caller.
    Pyro's ELBO interface is for ``SVI`` and hand-written loops, which pass no state:
    ``loss``, ``differentiable_loss`` and ``loss_and_grads`` return -N L_H (Pyro's sign
    and scale), and :meth:`update` commits. For them the objective keeps the running
    statistics itself, one table per (model, guide), built by the first training call
    (``loss_and_grads`` or :meth:`update`) with one pass over the data.

    **Evaluating is pure**: ``loss``, ``differentiable_loss``, :meth:`terms` and
    :meth:`evaluate` change neither the model, nor the guide, nor what the next call
    returns. Note that L_H is the ELBO at the scales that are optimal *for the data
    evaluated*: on the training data it is the training ELBO; on held-out data it
    re-fits lambda and sigma^2 to that data, so for a held-out ELBO at the trained
    scales use :func:`~pyro_esc.evaluation.held_out_elbo`. In a hand-written ``SVI``
    loop, each ``loss_and_grads`` writes the scales of the parameters it evaluated
    (the step's start) into the model, and ``elbo.update(model, guide, *args)`` after
    the loop those of the final parameters; the scales are set, not optimised: they
    stay out of SVI's parameter capture and optimiser.

    **Minibatches** (``subsample`` / ``subsample_size`` in the model's
    arguments), ``minibatch_statistics="running"`` (default): lambda*, sigma^2*
    and the entropy average come from a per-point table of the whole data set
    (:class:`~pyro_esc.statistics.RunningStatistics`), with the batch's rows
    at the current parameters and every other row as stored when its point was
    last visited. A table belongs to one (model, guide, data tensor); SVI's
    ``loss_and_grads`` stores the rows it evaluated and :meth:`update` the rows at
    the parameters after the step (:func:`~pyro_esc.fit` commits the latter only).
    Its sums are running totals, so reading and updating it costs O(batch).
    Without a table, ``loss`` and ``differentiable_loss`` compute every row
    afresh (the exact full-data value, O(N)). The value is a running estimate
    of the full-data objective; :func:`~pyro_esc.fit` records exact full-data
    values separately (``History.eval_elbo``).

    ``minibatch_statistics="batch"`` estimates lambda*, sigma^2* from the batch
    alone and scales by N / B. It needs no table but is **biased**: log of a
    batch mean is not the mean of the logs, so the estimate is too high, the
    more so the smaller the batch (BENCHMARKS.md, "Minibatch statistics", has the
    measurement).

    **Annealing** (docs/theory.md, Annealing): with ``annealing``, an
    :class:`~pyro_esc.annealing.Annealing`, the optimised objective is
    beta_q H[q] - beta_p H[p(z)] - beta_x H[p(x|z)] with the weights after the
    training step set by :meth:`set_annealing_step` (whoever owns the step
    count calls it: :func:`~pyro_esc.fit` does, before every step). The weights
    apply identically through ``SVI`` (``loss_and_grads``),
    ``differentiable_loss`` and Pyro's ``ELBOModule``; ``loss`` and the value
    ``loss_and_grads`` returns are always the true, unweighted -N L_H.

    Example::

        >>> import pyro
        >>> from pyro_esc import AnalyticELBO, EntropyELBO, LocalMultivariateNormal, SparseCoding
        >>> from pyro_esc.data import bars
        >>> pyro.clear_param_store()
        >>> x, _ = bars(100, seed=0)
        >>> model = SparseCoding(25, 10)
        >>> guide = LocalMultivariateNormal(model)
        >>> elbo = EntropyELBO()
        >>> loss = elbo.loss(model, guide, x)              # -N L_H: evaluating changes nothing
        >>> terms = elbo.update(model, guide, x)           # writes Theorem 2's lambda*, sigma^2* into the model
        >>> abs(AnalyticELBO().loss(model, guide, x) - loss) < 1e-4 * abs(loss)   # the standard ELBO there: the same
        True

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
        self.annealing_step = 0
        # Running tables by (model, guide); each checks that it belongs to the data it is used with.
        self._tables = {}

    # ------------------------------------------------------------ annealing

    @property
    def betas(self):
        """The weights (beta_q, beta_p, beta_x) that the optimised objective uses now."""
        return (1.0, 1.0, 1.0) if self.annealing is None else self.annealing.betas(self.annealing_step)

    def set_annealing_step(self, step):
        """Use the annealing weights after ``step`` completed training steps (0 before the first).

        The documented way to drive the schedule: :func:`~pyro_esc.fit` calls it
        before every step; a hand-written loop calls it too. Without annealing it
        only records the step.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        self.annealing_step = step

    # ------------------------------------------------------------ the functional core

    def init_statistics(self, model, guide, x):
        """The running statistics that minibatch training keeps for ``(model, guide, x)``: state.

        One pass over the data at the current parameters
        (:class:`~pyro_esc.statistics.RunningStatistics`), or None where minibatch evaluations
        need none (``minibatch_statistics="batch"``, or a joint guide, which cannot be subsampled).
        The caller owns it and passes it to :meth:`evaluate` and :meth:`commit`, the one
        call that changes it (:func:`~pyro_esc.fit`'s loop does, and checkpoints it).
        """
        if self.minibatch_statistics != "running":
            return None
        with torch.no_grad():
            evaluation = read_posterior(model, guide, (x,), {}, "EntropyELBO")
            if evaluation.posterior.is_joint:
                return None
            points = PointStatistics.of(x, evaluation.posterior, evaluation.dictionary, model.prior)
        return RunningStatistics(model, guide, x, points)

    def evaluate(self, model, guide, x, subsample=None, statistics=None, posterior=None):
        """The objective on ``x`` (or the minibatch ``x[subsample]``): a pure function of its arguments.

        On a minibatch with ``minibatch_statistics="running"`` the sums are the running
        ``statistics`` (:meth:`init_statistics`) with the batch's rows at the current
        parameters (read, not changed); without a subsample, or with ``"batch"``, they are
        the evaluated points' own.

        :param posterior: the batch's :class:`~pyro_esc.GaussianPosterior`, given as an argument
            instead of read from the guide (the row-wise route's rows).
        :returns: :class:`Evaluated` ``(loss, optimised, terms, points)``: -N L_H (differentiable),
            the loss training minimises (annealed, or the same tensor), the :class:`EntropyTerms`,
            and the batch's per-point statistics that a :meth:`commit` may store (None without a
            running table).
        :raises ValueError: for a running minibatch evaluation without ``statistics`` of this model,
            guide and data tensor.
        """
        kwargs = {} if subsample is None else {"subsample": subsample}
        evaluation = read_posterior(model, guide, (x,), kwargs, "EntropyELBO", posterior=posterior)
        if evaluation.subsample is None or self.minibatch_statistics == "batch":
            terms, points = entropy_terms(BatchStatistics.of(evaluation, model.prior), model.prior), None
        else:
            x, subsample, x_batch, posterior, dictionary = evaluation
            if posterior.is_joint:
                raise ValueError("running minibatch statistics need per-point posteriors; this guide is joint")
            check_distinct(subsample)
            if statistics is None or not statistics.belongs_to(model, guide, x):
                raise ValueError("a minibatch evaluation with running statistics needs those of this model, guide "
                                 "and data tensor: statistics=elbo.init_statistics(model, guide, x)")
            points = PointStatistics.of(x_batch, posterior, dictionary, model.prior)
            terms = entropy_terms(statistics.combine(subsample, points), model.prior)
        loss = -terms.num_data * terms.elbo
        terms.check_finite(loss)
        betas = self.betas
        optimised = loss if betas == (1.0, 1.0, 1.0) else -terms.num_data * terms.weighted_elbo(*betas)
        return Evaluated(loss, optimised, terms, points)

    @torch.no_grad()
    def commit(self, model, guide, x, subsample=None, statistics=None, points=None, terms=None):
        """The one call that changes state: store the batch's rows, then write lambda*, sigma^2* into the model.

        - With running ``statistics`` and a ``subsample``: the batch's rows are stored in them
          (``points``, as a step evaluated them, or evaluated now), and the scales are those of
          the whole table (O(batch)).
        - Otherwise the scales are those of ``terms`` (an evaluation of the current parameters
          that the caller has at hand, e.g. L-BFGS's last) or of an evaluation now; a full pass
          (no ``subsample``) also refreshes every row of ``statistics``, if given.

        :returns: the :class:`EntropyTerms` written.
        """
        if statistics is not None and subsample is not None and self.minibatch_statistics == "running":
            if not statistics.belongs_to(model, guide, x):
                raise ValueError("statistics belong to another model, guide or data tensor: build this one's with "
                                 "elbo.init_statistics(model, guide, x)")
            check_distinct(subsample)
            if points is None:
                evaluation = read_posterior(model, guide, (x,), {"subsample": subsample}, "EntropyELBO")
                points = PointStatistics.of(evaluation.x_batch, evaluation.posterior, evaluation.dictionary,
                                            model.prior)
            statistics.store(subsample, points)
            terms = entropy_terms(statistics.totals(), model.prior)
        elif terms is None or (statistics is not None and subsample is None):
            kwargs = {} if subsample is None else {"subsample": subsample}
            evaluation = read_posterior(model, guide, (x,), kwargs, "EntropyELBO")
            terms = entropy_terms(BatchStatistics.of(evaluation, model.prior), model.prior)
            if subsample is None and statistics is not None and statistics.belongs_to(model, guide, x):
                # A full pass refreshes every row (an exact resynchronisation).
                statistics.store(None, PointStatistics.of(x, evaluation.posterior, evaluation.dictionary,
                                                          model.prior))
        else:
            terms = EntropyTerms(*(value.detach() if isinstance(value, torch.Tensor) else value for value in terms))
        terms.check_finite()
        model.assign_scales(terms.prior_scale, terms.noise_var)
        return terms

    # ------------------------------------------------------------ Pyro's ELBO interface
    #
    # SVI and a hand-written loop pass no state: for them the objective keeps the running statistics itself,
    # one table per (model, guide), built by the first training call. fit passes its own (the functional core).

    def terms(self, model, guide, *args, **kwargs):
        """The :class:`EntropyTerms` at the current guide and dictionary (differentiable, pure)."""
        return self._pyro_evaluate(model, guide, args, kwargs, training=False).terms

    def _resolve(self, model, args, kwargs):
        # The model's checks first (a model the closed form does not describe gets its message), then x and batch.
        check_closed_form_model(model, "EntropyELBO")
        return model.resolve_data(*args, **kwargs)

    def _pyro_evaluate(self, model, guide, args, kwargs, training):
        x, subsample = self._resolve(model, args, kwargs)
        statistics = None
        if subsample is not None and self.minibatch_statistics == "running":
            statistics = self._table(model, guide, x, create=training)
        evaluated = self.evaluate(model, guide, x, subsample, statistics)
        if training and evaluated.points is not None:
            statistics.store(subsample, evaluated.points)
        return evaluated

    def _table(self, model, guide, x, create):
        # The running table of (model, guide, x): the stored one, or one pass over the data.
        # Only a training call (create=True) keeps a new table; evaluation stays pure.
        key = (id(model), id(guide))
        table = self._tables.get(key)
        if table is not None and table.belongs_to(model, guide, x):
            return table
        if not create and torch.is_grad_enabled():
            warnings.warn("EntropyELBO: no running statistics for this model, guide and data tensor, so every "
                          "row is computed afresh (a pass over all N points). When training with minibatches "
                          "outside fit, call elbo.update(...) or train through SVI (loss_and_grads), which keep "
                          "them; pass the same data tensor every step.", RuntimeWarning, stacklevel=4)
        elif create and table is not None:
            warnings.warn("EntropyELBO: the data tensor changed (a new tensor, or changed in place), so the running "
                          "statistics are rebuilt with a pass over all N points; pass the same, unchanged tensor "
                          "every step to keep minibatch steps O(batch).", RuntimeWarning, stacklevel=4)
        table = self.init_statistics(model, guide, x)
        if create and table is not None:
            # Forget tables whose model or guide is gone, then keep this one.
            self._tables = {k: t for k, t in self._tables.items() if t._model() is not None and t._guide() is not None}
            self._tables[key] = table
        return table

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The optimised loss as a differentiable tensor: -N L_H, or its annealed version (pure)."""
        return self._pyro_evaluate(model, guide, args, kwargs, training=False).optimised

    def loss(self, model, guide, *args, **kwargs):
        """-N L_H as a float (never annealed; pure)."""
        with torch.no_grad():
            return float(self._pyro_evaluate(model, guide, args, kwargs, training=False).loss)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """SVI's training call: backpropagates the optimised (possibly annealed) loss; returns -N L_H.

        With running minibatch statistics it builds the table on its first call
        and stores the rows it evaluated. It also writes the scales it evaluated,
        Theorem 2's lambda*, sigma^2* of the parameters before the step, into the
        model: so after a plain ``SVI`` loop the model is never left at its initial
        scales (which ``AnalyticELBO``, ``held_out_elbo`` and ``log_likelihood``
        would read); :meth:`update` after the loop writes those of the final
        parameters.
        """
        evaluated = self._pyro_evaluate(model, guide, args, kwargs, training=True)
        evaluated.optimised.backward(retain_graph=self.retain_graph)
        with torch.no_grad():
            # Outside pyro.param (assign_scales writes the stored tensors): SVI's capture does not see them.
            model.assign_scales(evaluated.terms.prior_scale.detach(), evaluated.terms.noise_var.detach())
        return evaluated.loss.item()

    @torch.no_grad()
    def update(self, model, guide, *args, **kwargs):
        """Commit the current guide and dictionary: the one call that changes state (:meth:`commit`).

        For the points in the arguments (the batch, or all points) it stores
        their statistics at the current parameters in the running table (built
        with one pass over the data if there is none and the arguments are a
        minibatch), then writes lambda*, sigma^2* (of the whole table, or of the
        evaluated data) into the model with ``model.assign_scales``.

        :returns: the :class:`EntropyTerms` after the update: exact full-data
            values for full-batch arguments, the running estimate for a minibatch.
        """
        x, subsample = self._resolve(model, args, kwargs)
        if subsample is not None and self.minibatch_statistics == "running":
            table = self._table(model, guide, x, create=True)
        else:
            table = self._tables.get((id(model), id(guide)))
            table = table if table is not None and table.belongs_to(model, guide, x) else None
        return self.commit(model, guide, x, subsample, table)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("EntropyELBO is closed form: it draws no traces")


class AnalyticELBO(ELBO):
    r"""The standard ELBO in closed form, at the model's current lambda and sigma^2.

    For Gaussian q^(n) (docs/theory.md, The ELBO and Gaussian posteriors), summing over data points::

        F_n = E_q[log p(x^(n)|z)] + E_q[log p(z)] + H[q^(n)]
            = - D/2 log(2 pi sigma^2) - E||x^(n) - W z||^2 / (2 sigma^2)
              - sum_h [ log(2 lambda_h) + E|z_h| / lambda_h ] + H[q^(n)]

    (the Laplace prior's cross-entropy; any prior of :mod:`pyro_esc.priors` gives its own
    through ``model.prior.cross_entropy``).

    The loss is -sum_n F_n (scaled by N / B for minibatches), like Pyro's
    ``Trace_ELBO`` but exact. lambda and sigma^2 are read inside the model's
    Pyro context, so SVI learns them by gradient. At Theorem 2's lambda*,
    sigma^2* it equals :class:`EntropyELBO` exactly.

    Example::

        >>> import pyro
        >>> from pyro_esc import AnalyticELBO, EntropyELBO, LocalMultivariateNormal, SparseCoding
        >>> from pyro_esc.data import bars
        >>> pyro.clear_param_store()
        >>> x, _ = bars(100, seed=0)
        >>> model = SparseCoding(25, 10)
        >>> guide = LocalMultivariateNormal(model)
        >>> before = AnalyticELBO().loss(model, guide, x)      # -sum_n F_n at the model's current lambda, sigma^2
        >>> terms = EntropyELBO().update(model, guide, x)      # move them to Theorem 2's optimum
        >>> AnalyticELBO().loss(model, guide, x) <= before     # a lower loss: a higher ELBO
        True

    """

    def __init__(self):
        super().__init__(num_particles=1)

    def evaluate(self, model, guide, x, subsample=None, posterior=None):
        """-sum_n F_n on ``x`` (or the minibatch ``x[subsample]``, scaled by N / B) as a differentiable tensor.

        :param posterior: the batch's :class:`~pyro_esc.GaussianPosterior`, given as an argument instead of
            read from the guide (the row-wise route's rows).
        """
        return self._loss(batch_statistics(model, guide, x, posterior=posterior,
                                           **({} if subsample is None else {"subsample": subsample})), model)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """-sum_n F_n as a differentiable tensor."""
        return self._loss(batch_statistics(model, guide, *args, **kwargs), model)

    def _loss(self, stats, model):
        prior_scale, noise_var = model.read_scales()
        batch, dim = stats.num_points, stats.data_dim
        elbo_sum = (stats.entropy
                    + batch * normal_log_normalizer(noise_var, dim)
                    - stats.sq_error_sum / (2 * noise_var)
                    - batch * model.prior.cross_entropy(stats.statistic_sum / batch, prior_scale))
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


def entropy_elbo_per_point(model, guide, x):
    """:func:`training_elbo` as the training loop evaluates it: in the current scope, on any x."""
    with torch.no_grad():
        return -EntropyELBO().loss(model, guide, x) / x.size(0)


def analytic_elbo_per_point(model, guide, x):
    """:func:`held_out_elbo` as the training loop evaluates it: in the current scope, on any x."""
    with torch.no_grad():
        return -AnalyticELBO().loss(model, guide, x) / x.size(0)
