r"""The EM route of :func:`~pyro_esc.fit`: solved posteriors and a closed-form dictionary.

Variational EM on the ELBO F(q, W, lambda, sigma^2) with one Gaussian per data point
(``AutoNormal``: diagonal; :class:`~pyro_esc.LocalMultivariateNormal`: full covariance).

1. **E-step** (every step, on its batch): the batch's posteriors are brought to their optimum
   at the current model by :func:`~pyro_esc.solver.solve_posteriors` (warm-started from the
   posteriors stored at the points' last visit), written into the guide's rows, and their
   sufficient statistics added to the chunk's::

       A = sum_n (nu_n nu_n^T + T_n)   (H x H),   B = sum_n x_n nu_n^T   (D x H),
       sum_n E|z_n|,   sum_n H[q_n],   sum_n ||x_n||^2

2. **M-step** (once the chunk holds ``chunk`` points; every step on the full data): given
   the posteriors, the model is linear-Gaussian in W, so the dictionary that maximises F is
   closed form, W_EM = B A^-1 with unit columns (the columns' lengths are a gauge that the
   prior absorbs: z_h -> c_h z_h, lambda_h -> c_h lambda_h leave F unchanged). The dictionary
   set is W_EM extrapolated along the last M-step's change (heavy ball)::

       W <- normalise(W_EM + beta (W - W_previous))

   with the extrapolation dropped when it points against the EM step (an adaptive restart,
   O'Donoghue and Candes 2015). Each column of B A^-1, measured along its new direction, sets
   the gauge, in which the statistics and the stored posteriors are rescaled; then Theorem 2
   gives lambda* = E|z| and sigma^2* = (sum ||x||^2 - 2 tr(W^T B) + tr(W^T W A)) / (N D) from
   the same statistics.

Why these choices (BENCHMARKS.md, "Learning at scale"): plain EM converges slowly on sparse
coding (broad posteriors: much "missing information"), and the momentum cuts the M-steps it
needs several-fold. At scale, the statistics of the latest chunk of some ten thousand points
beat those of all N (which mix posteriors solved against dictionaries of a whole pass ago) and
those of small chunks (noisy), and the dictionary moves N / chunk times per pass over the data.
On the full data with ``momentum=0`` each E- and M-step raises F (EM's monotonicity).

With annealing (beta_q, beta_p, beta_x) the E-step solves the weighted objective (the
standard one at lambda beta_q / beta_p, sigma^2 beta_q / beta_x); the M-step is unchanged,
as the weights scale the prior and likelihood terms as a whole. Schedules with
beta_p > beta_q are refused: that objective grows without bound as latents switch off
(:mod:`pyro_esc.annealing`), and exact E- and M-steps follow it to lambda -> 0.

The last step of a run (:meth:`EMStep.finish`) solves every point's posterior at the final
model, so the guide returned holds the model's own posteriors.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributions import transform_to

import pyro

from .._checks import check_int, check_positive
from .._pyro_internals import param_fullname
from ..infer.objectives import EntropyELBO, NonFiniteObjectiveError
from ..infer.solver import DEFAULT_TOL as SOLVER_TOL
from ..infer.solver import solve_at
from ..models.sparse_coding import MODEL_PARAMETERS
from ..variational.guides import covariance_family  # noqa: F401 - public here too
from ..variational.rows import per_point_parameters, rows_posterior

__all__ = ["DEFAULT_CHUNK", "DEFAULT_E_TOL", "DEFAULT_MOMENTUM", "EM", "EMStep", "MIN_CHUNK", "covariance_family"]

#: The E-step's tolerance during training (nats per point; half the Newton decrement). The model moves
#: after every batch, so solving a batch more exactly than this buys nothing: evaluations see the rows as
#: they are, and solve_posteriors gives exact posteriors at the final model.
DEFAULT_E_TOL = 1e-6
#: The heavy-ball weight of the dictionary's extrapolation between full-data M-steps. On minibatches the
#: default is none: between chunks it changed nothing measurable at equal epochs (BENCHMARKS.md, "Learning
#: at scale").
DEFAULT_MOMENTUM = 0.9
#: Points per M-step on minibatches unless ``EM(chunk=...)`` says otherwise: a tenth of the data, at least
#: MIN_CHUNK and at most DEFAULT_CHUNK (BENCHMARKS.md, "Learning at scale").
DEFAULT_CHUNK = 12800
MIN_CHUNK = 5120
#: Points an E-step solves at once when it is not a training batch (the last E-step of a run).
SOLVE_BATCH = 4096
#: Newton iterations per point in an E-step at most.
E_MAX_ITER = 50
#: A dictionary column whose least-squares length is below this fraction of the longest is kept as it was
#: (its latent explains nothing; normalising a vector of rounding noise would give it a random direction).
DEAD_COLUMN = 1e-8


@dataclass(frozen=True)
class EM:
    """Options of the EM route of :func:`~pyro_esc.fit`: ``fit(..., optimizer=EM(chunk=10240))``.

    ``optimizer="em"`` is ``EM()``.

    Example::

        >>> import pyro
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyro_esc import EM, SparseCoding, fit
        >>> from pyro_esc.data import bars
        >>> pyro.clear_param_store()
        >>> x, _ = bars(400, seed=0)
        >>> model = SparseCoding(25, 10)
        >>> guide = AutoNormal(model, create_plates=model.create_plates)
        >>> history = fit(model, guide, x, optimizer=EM(chunk=200), batch_size=100, epochs=3, progress=False)
        >>> history.route, history.optimizer, history.step[-1]
        ('em', 'EM', 12)

    :param int chunk: data points whose posteriors are solved between two M-steps. None (default):
        all N points on the full data; on minibatches a tenth of them, at least :data:`MIN_CHUNK`
        and at most :data:`DEFAULT_CHUNK` (and at most N) (BENCHMARKS.md, "Learning at scale").
        The M-step's statistics are the chunk's: a smaller chunk moves the dictionary more often
        per pass over the data, and estimates it from fewer points.
    :param float momentum: beta of the dictionary's heavy-ball extrapolation between M-steps, in
        [0, 1); 0 is plain EM. None (default): :data:`DEFAULT_MOMENTUM` when the M-steps see all N
        points, 0 when they see a chunk.
    :param float tol: the E-step's tolerance, in nats per point (:data:`DEFAULT_E_TOL`).
    """

    chunk: Optional[int] = None
    momentum: Optional[float] = None
    tol: float = DEFAULT_E_TOL

    def __post_init__(self):
        if self.chunk is not None:
            check_int(self.chunk, "chunk")
        if self.momentum is not None and (isinstance(self.momentum, bool) or not isinstance(
                self.momentum, numbers.Real) or not 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be None or a number in [0, 1), got {self.momentum!r}")
        check_positive(self.tol, "tol")

    def momentum_for(self, chunk, num_data):
        """The momentum a run uses whose M-steps see ``chunk`` of its ``num_data`` points."""
        if self.momentum is not None:
            return float(self.momentum)
        return DEFAULT_MOMENTUM if chunk >= num_data else 0.0

    def chunk_for(self, num_data, batch_size):
        """The chunk a run with N = ``num_data`` points and minibatches of ``batch_size`` uses."""
        if self.chunk is not None:
            return min(self.chunk, num_data)
        if batch_size >= num_data:
            return num_data
        return min(num_data, max(MIN_CHUNK, min(DEFAULT_CHUNK, num_data // 10)))


class _Rows:
    """A per-point guide's rows in the param store: read a batch as a posterior, write a posterior back."""

    def __init__(self, guide, family):
        declared = per_point_parameters(guide)
        store = pyro.get_param_store()
        self.guide, self.family = guide, family
        self.names = [parameter.name for parameter in declared]
        self.transforms = [transform_to(parameter.constraint) for parameter in declared]
        self.tensors = [store[name].unconstrained() for name in self.names]

    @torch.no_grad()
    def read(self, x, subsample):
        """The stored posteriors of ``subsample`` (the guide builds them from their rows), detached."""
        return rows_posterior(self.guide, [transform(tensor.index_select(0, subsample))
                                           for transform, tensor in zip(self.transforms, self.tensors)])

    @torch.no_grad()
    def rescale(self, factor, chunk=16384):
        """Every row's posterior becomes that of c z (c = ``factor``, (H,) > 0): the gauge of an M-step."""
        num_data = self.tensors[0].size(0)
        for start in range(0, num_data, chunk):
            rows = slice(start, min(start + chunk, num_data))
            values = [transform(tensor[rows]) for transform, tensor in zip(self.transforms, self.tensors)]
            if self.family == "diag":
                values = [value * factor for value in values]
            else:
                mean, diagonal, off_diagonal = values
                lower, _ = torch.tril_indices(factor.numel(), factor.numel(), -1, device=factor.device)
                values = [mean * factor, diagonal * factor, off_diagonal * factor[lower]]
            for tensor, transform, value in zip(self.tensors, self.transforms, values):
                tensor[rows] = transform.inv(value)

    @torch.no_grad()
    def write(self, subsample, posterior):
        """Store ``posterior`` (of the family) as the rows ``subsample``."""
        if self.family == "diag":
            values = [posterior.mean, posterior.stddev]
        else:
            tril = posterior.scale_tril
            rows, columns = torch.tril_indices(tril.size(-1), tril.size(-1), -1, device=tril.device)
            values = [posterior.mean, tril.diagonal(dim1=-2, dim2=-1), tril[..., rows, columns]]
        for tensor, transform, value in zip(self.tensors, self.transforms, values):
            tensor.index_copy_(0, subsample, transform.inv(value.to(tensor.dtype)))


class _Statistics:
    """Sums over the points seen of what the M-step and the ELBO need (float64), in the current gauge."""

    def __init__(self, data_dim, n_latents, device, prior):
        like = dict(dtype=torch.float64, device=device)
        self.prior = prior
        self.count = 0
        self.second = torch.zeros(n_latents, n_latents, **like)  # sum nu nu^T + T
        self.cross = torch.zeros(data_dim, n_latents, **like)  # sum x nu^T
        self.statistic_sum = torch.zeros(n_latents, **like)  # sum E phi(z), the prior's statistic (E|z| for Laplace)
        self.entropy = torch.zeros((), **like)  # sum H[q]
        self.sq_norm = torch.zeros((), **like)  # sum ||x||^2

    def add(self, x, posterior, sign=1.0):
        x = x.to(self.cross)
        mean = posterior.mean.to(self.cross)
        covariance_sum = (posterior.variance.to(self.cross).sum(0).diag() if posterior.family == "diagonal"
                          else posterior.covariance_matrices().to(self.cross).sum(0))
        self.count += int(sign) * x.size(0)
        self.second += sign * (mean.T @ mean + covariance_sum)
        self.cross += sign * (x.T @ mean)
        self.statistic_sum += sign * self.prior.expected_statistic(mean, posterior.stddev.to(self.cross)).sum(0)
        self.entropy += sign * posterior.point_entropies().to(self.cross).sum()
        self.sq_norm += sign * x.square().sum()

    def regauge(self, factor):
        """Express the sums for z -> factor * z (factor (H,) > 0)."""
        self.second *= factor.unsqueeze(0) * factor.unsqueeze(1)
        self.cross *= factor
        self.statistic_sum *= factor ** self.prior.degree  # phi(c z) = c^degree phi(z)
        self.entropy += self.count * factor.log().sum()

    def squared_error(self, dictionary):
        """sum_n E||x_n - W z||^2 at W (D, H)."""
        dictionary = dictionary.to(self.cross)
        return (self.sq_norm - 2 * (dictionary * self.cross).sum()
                + ((dictionary.T @ dictionary) * self.second).sum()).clamp_min(0)

    def state_dict(self):
        return {"count": self.count, "second": self.second, "cross": self.cross, "statistic_sum": self.statistic_sum,
                "entropy": self.entropy, "sq_norm": self.sq_norm}

    def load_state_dict(self, state):
        self.count = int(state["count"])
        for name in ("second", "cross", "statistic_sum", "entropy", "sq_norm"):
            # "abs_sum": the statistic's name in checkpoints written before priors were pluggable.
            getattr(self, name).copy_(state["abs_sum" if name == "statistic_sum" and name not in state else name])


class EMStep:
    """One step of variational EM: solve a batch's posteriors; every ``chunk`` points, update the model.

    See the module docstring for the E- and M-steps and the momentum.

    :param model: a :class:`~pyro_esc.SparseCoding`.
    :param guide: ``AutoNormal`` or :class:`~pyro_esc.LocalMultivariateNormal` (one Gaussian per point).
    :param loss: :class:`~pyro_esc.EntropyELBO` (its annealing weights drive the E-step) or
        :class:`~pyro_esc.AnalyticELBO`.
    :param torch.Tensor first_batch: indices used once to set model and guide up (None: all points).
    :param frozen: the model's parameters to leave as they are: ``("raw_dictionary",)`` keeps W
        (lambda*, sigma^2* are still set); all of :data:`~pyro_esc.model.MODEL_PARAMETERS` keeps the
        whole model (E-steps only).
    :param int chunk: points whose posteriors are solved between two M-steps (default: all N).
    :param float momentum: beta of the dictionary's heavy-ball extrapolation (0: plain EM).
    :param float tol: the E-step's tolerance (:data:`DEFAULT_E_TOL`).
    """

    route = "em"
    name = "EM"

    def __init__(self, model, guide, loss, x, first_batch=None, frozen=(), chunk=None, momentum=DEFAULT_MOMENTUM,
                 tol=DEFAULT_E_TOL):
        from .steppers import trainable_parameters

        self.family = covariance_family(guide)
        if self.family is None:
            raise ValueError(f"the EM route solves per-point Gaussian guides (AutoNormal: diagonal, "
                             f"LocalMultivariateNormal: full covariance); {type(guide).__name__} is neither: "
                             f"use optimizer='lbfgs', 'rowwise' or 'svi'")
        if model.prior.degree is None:
            raise ValueError(f"optimizer='em' rescales the latents, which needs a prior whose statistic is "
                             f"homogeneous (Prior.degree); {model.prior!r} has none: use optimizer='lbfgs' or "
                             f"'rowwise'")
        self.model, self.guide, self.loss = model, guide, loss
        kwargs = {} if first_batch is None else {"subsample": first_batch}
        # One evaluation sets model (initialised from the data) and guide up, as for the other routes.
        trainable_parameters(model, guide, EntropyELBO(), x, (), kwargs=kwargs)
        self.rows = _Rows(guide, self.family)
        model_names = [param_fullname(model, name) for name in MODEL_PARAMETERS]
        self.train_dictionary = "raw_dictionary" not in frozen
        self.train_scales = not set(MODEL_PARAMETERS) <= set(frozen)
        trained = (model_names if self.train_dictionary else model_names[1:]) if self.train_scales else []
        self.names = sorted(set(trained) | set(self.rows.names))
        self.chunk = x.size(0) if chunk is None else int(chunk)
        self.momentum = float(momentum)
        self.tol = tol
        with torch.no_grad():
            n_latents = model.dictionary.size(1)
        self.statistics = _Statistics(x.size(1), n_latents, x.device, self.model.prior)
        # The dictionary before the last M-step (for the momentum), None after a restart.
        self.previous = None
        # Which points have been solved (the others' rows still hold the guide's initial values).
        self.visited = torch.zeros(x.size(0), dtype=torch.bool, device=x.device)
        self.evaluations = 0
        self.restarts = 0

    # ------------------------------------------------------------------ the step

    def step(self, x, kwargs, statistics=None):
        """The E-step on the batch ``kwargs.get("subsample")`` (all points if absent), and the M-step if due.

        :returns: ``(value, None)``: -N times the ELBO per point of the chunk's posteriors at the model
            (after the M-step when one was due): exact when the chunk is all N points, else an estimate.
            There is no gradient norm.
        """
        subsample = kwargs.get("subsample")
        if subsample is None:
            subsample = torch.arange(x.size(0), device=x.device)
        self.solve(x, subsample, self.statistics)
        chunk_done = self.statistics.count >= self.chunk
        if chunk_done and (self.train_dictionary or self.train_scales):
            self._maximise(x.size(1))
        value = self._value(self.statistics, x.size(0))
        if chunk_done:  # the next chunk's statistics start afresh
            self.statistics = _Statistics(x.size(1), self.statistics.second.size(0), x.device, self.model.prior)
        return value, None

    def commit(self, value, x, kwargs, statistics=None):
        """After a step: nothing left to write (the M-step set W, lambda*, sigma^2* from the chunk's
        statistics); see :meth:`~pyro_esc.train.steppers.SVIStep.commit`."""
        return value, float(self.model.noise_var.detach())

    def solve(self, x, subsample, statistics, tol=None):
        """The E-step: the posteriors of ``subsample`` solved at the model, stored, and added to ``statistics``.

        :param float tol: the solver's tolerance (default the route's, :attr:`tol`).
        """
        x_batch = x.index_select(0, subsample)
        stored = self.rows.read(x, subsample).to(torch.float64)
        with torch.no_grad():
            dictionary = self.model.dictionary.detach()
            prior_scale, noise_var = self.model.prior_scale.detach(), self.model.noise_var.detach()
        seen = self.visited.index_select(0, subsample)
        betas = tuple(getattr(self.loss, "betas", (1.0, 1.0, 1.0)))
        solved = solve_at(x_batch, dictionary, prior_scale, noise_var, self.family, init=stored, fresh=~seen,
                          tol=self.tol if tol is None else tol, max_iter=E_MAX_ITER, betas=betas,
                          out_dtype=torch.float64, prior=self.model.prior)
        self.evaluations += int(solved.iterations.max()) if solved.iterations.numel() else 0
        statistics.add(x_batch, solved.posterior)
        self.rows.write(subsample, solved.posterior)
        self.visited.index_fill_(0, subsample, True)

    @torch.no_grad()
    def _maximise(self, data_dim):
        """The M-step: W (if trained) from the chunk's statistics, with momentum; then lambda*, sigma^2*."""
        statistics = self.statistics
        if self.train_dictionary:
            current = self.model.dictionary.detach().to(statistics.cross)
            factor = torch.linalg.cholesky(statistics.second)
            free = torch.cholesky_solve(statistics.cross.T, factor).T  # B A^-1
            lengths = free.norm(dim=0)
            dead = lengths < DEAD_COLUMN * lengths.max()
            target = torch.where(dead, current, free / torch.where(dead, torch.ones_like(lengths), lengths))
            direction = target
            if self.momentum > 0 and self.previous is not None:
                velocity = current - self.previous
                # Restart (O'Donoghue and Candes): drop the momentum when it points against the EM step.
                if float((velocity * (target - current)).sum()) < 0:
                    self.restarts += 1
                else:
                    direction = target + self.momentum * velocity
                    direction = direction / direction.norm(dim=0)
            self.previous = current
            # The gauge the statistics and stored posteriors move to: each free column's length along its
            # new direction (its length exactly, without extrapolation; a dead column keeps its scale).
            lengths = (direction * free).sum(0)
            lengths = torch.where(dead | ~(lengths > 0), torch.ones_like(lengths), lengths)
            statistics.regauge(lengths)
            self.rows.rescale(lengths.to(self.rows.tensors[0].dtype))
            self.model.set_dictionary(direction.to(self.model.dictionary.dtype))
        if self.train_scales:
            prior_scale, noise_var = self._optimal_scales(statistics, data_dim)
            like = self.model.prior_scale
            self.model.assign_scales(prior_scale.to(like), noise_var.to(like))

    def _optimal_scales(self, statistics, data_dim):
        dictionary = self.model.dictionary.detach()
        prior_scale = self.model.prior.optimal_scale(statistics.statistic_sum / statistics.count)
        prior_scale = prior_scale.clamp_min(torch.finfo(dictionary.dtype).tiny)
        noise_var = statistics.squared_error(dictionary) / (statistics.count * data_dim)
        return prior_scale, noise_var

    def _value(self, statistics, num_data):
        """-N times the standard ELBO per point of the statistics' posteriors at the model's scales."""
        with torch.no_grad():
            dictionary = self.model.dictionary.detach()
            prior_scale = self.model.prior_scale.detach().to(torch.float64)
            noise_var = self.model.noise_var.detach().to(torch.float64)
        count, data_dim = statistics.count, dictionary.size(0)
        elbo = (statistics.entropy / count
                - self.model.prior.cross_entropy(statistics.statistic_sum / count, prior_scale)
                - 0.5 * data_dim * (math.log(2 * math.pi) + noise_var.log())
                - statistics.squared_error(dictionary) / (2 * noise_var * count))
        value = float(-num_data * elbo)
        if not math.isfinite(value):
            raise NonFiniteObjectiveError(f"EM: the ELBO is not finite (sigma^2 = {float(noise_var):g}, lambda in "
                                          f"[{float(prior_scale.min()):g}, {float(prior_scale.max()):g}])")
        return value

    # ------------------------------------------------------------------ the end of a run

    @torch.no_grad()
    def finish(self, x, batch_size=None):
        """Solve every point's posterior at the final model, then set lambda*, sigma^2* (W unchanged).

        The stored posteriors are from each point's last visit, under an earlier model; this last
        E-step makes the guide the model's own (and the reported ELBO the final model's).
        """
        batch_size = batch_size or SOLVE_BATCH
        statistics = _Statistics(x.size(1), self.statistics.second.size(0), x.device, self.model.prior)
        for start in range(0, x.size(0), batch_size):
            self.solve(x, torch.arange(start, min(start + batch_size, x.size(0)), device=x.device), statistics,
                       tol=SOLVER_TOL)
        if self.train_scales:
            prior_scale, noise_var = self._optimal_scales(statistics, x.size(1))
            like = self.model.prior_scale
            self.model.assign_scales(prior_scale.to(like), noise_var.to(like))

    # ------------------------------------------------------------------ the stepper protocol

    def set_lr(self, lr):
        raise ValueError("the EM route has no learning rate")

    def current_lr(self):
        return float("nan")

    def reset(self):
        """Forget the momentum (the next M-step is plain EM)."""
        self.previous = None

    def state_dict(self):
        return {"statistics": self.statistics.state_dict(), "visited": self.visited.clone(),
                "previous": self.previous, "restarts": self.restarts}

    def load_state_dict(self, state):
        self.statistics.load_state_dict(state["statistics"])
        self.visited.copy_(state["visited"])
        self.previous = state["previous"]
        self.restarts = int(state["restarts"])
