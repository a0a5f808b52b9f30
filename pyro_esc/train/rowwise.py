"""The row-wise route of :func:`~pyro_esc.fit`: minibatch steps that cost O(batch), not O(N).

With a per-point guide, each data point's posterior has parameters of its own
(a row of each (N, ...) tensor), and a minibatch tells the objective about the
batch's rows only. :class:`RowwiseStep` takes one step touching nothing else:

1. gather the batch's rows of every per-point parameter (unconstrained) into
   small tensors of its own, and hand them, constrained, to the guide as an
   argument: :func:`pyro_esc.rows.rows_posterior` builds the batch's posterior;
2. evaluate the objective on that posterior (for :class:`~pyro_esc.EntropyELBO`
   with the run's running statistics, whose totals are O(H) to update) and
   differentiate with respect to those rows and the global parameters (the
   dictionary);
3. update the rows with :class:`RowwiseAdam` (Adam state per row, touched only
   when the row is in the batch) and write them back; update the global
   parameters with ``torch.optim.Adam``.

So a point's posterior moves only when its point is in the batch: Adam's
momentum does not keep moving the others (which SVI's dense Adam does, at
O(N) cost per step). With ``inner_steps=K`` the batch's rows take K - 1
updates with the dictionary held fixed before the step that also updates the
dictionary: a partial E-step, in the spirit of the authors' EM scheme (which
optimises the batch's posteriors to convergence with L-BFGS before each
dictionary step).
"""

import math

import torch
from torch.distributions import transform_to

from ..infer.objectives import EntropyELBO, NonFiniteObjectiveError
from ..variational.rows import per_point_parameters, rows_posterior
from .steppers import _committed, trainable_parameters

__all__ = ["RowwiseAdam", "RowwiseStep"]


class RowwiseAdam:
    r"""Adam with its state kept per row, for a parameter with one row per data point.

    For the rows ``b`` of a batch, with gradient g_b and each row's own step count t_b::

        m_b <- beta_1 m_b + (1 - beta_1) g_b,    v_b <- beta_2 v_b + (1 - beta_2) g_b^2
        theta_b <- theta_b - lr (m_b / (1 - beta_1^t_b)) / (sqrt(v_b / (1 - beta_2^t_b)) + eps)

    Rows outside the batch are neither read nor written. This is torch's
    ``SparseAdam`` except that the bias correction uses each row's own count
    (SparseAdam uses the global step): a row's updates are exactly those of an
    Adam that saw only that point's steps.

    :param torch.Tensor param: the (N, ...) unconstrained parameter (its rows are updated in place).
    """

    def __init__(self, param, lr, betas=(0.9, 0.999), eps=1e-8):
        self.param = param
        self.lr, self.betas, self.eps = float(lr), tuple(betas), float(eps)
        self.exp_avg = torch.zeros_like(param, memory_format=torch.contiguous_format).detach()
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.steps = torch.zeros(param.size(0), dtype=torch.long, device=param.device)

    @torch.no_grad()
    def step(self, subsample, rows, grad):
        """Update the rows ``subsample`` (current values ``rows``, gradient ``grad``); return the new rows."""
        beta1, beta2 = self.betas
        steps = self.steps.index_select(0, subsample) + 1
        self.steps.index_copy_(0, subsample, steps)
        exp_avg = self.exp_avg.index_select(0, subsample).mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq = self.exp_avg_sq.index_select(0, subsample).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.exp_avg.index_copy_(0, subsample, exp_avg)
        self.exp_avg_sq.index_copy_(0, subsample, exp_avg_sq)
        shape = (-1,) + (1,) * (rows.dim() - 1)
        exponent = steps.to(rows.dtype).view(shape)
        bias1 = 1 - beta1 ** exponent
        bias2 = 1 - beta2 ** exponent
        denominator = (exp_avg_sq / bias2).sqrt_().add_(self.eps)
        new_rows = rows - self.lr * (exp_avg / bias1) / denominator
        self.param.index_copy_(0, subsample, new_rows)
        return new_rows

    def reset(self):
        """Forget the moments and counts of every row."""
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.steps.zero_()

    def state_dict(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps, "lr": self.lr}

    def load_state_dict(self, state):
        for name in ("exp_avg", "exp_avg_sq", "steps"):
            getattr(self, name).copy_(state[name])
        self.lr = float(state["lr"])


class RowwiseStep:
    """One O(batch) minibatch step for a closed-form objective and a per-point guide (see the module docstring).

    :param loss: :class:`~pyro_esc.EntropyELBO` or :class:`~pyro_esc.AnalyticELBO`.
    :param torch.Tensor first_batch: indices of a minibatch, used once to find the parameters
        (so that setting up never builds a graph over all N points).
    :param float lr: Adam's learning rate for rows and global parameters alike.
    :param frozen: the model's parameters to leave untrained (attribute names).
    :param int inner_steps: updates of the batch's rows per step; all but the last hold the
        global parameters fixed.
    """

    route = "rowwise"

    def __init__(self, model, guide, loss, x, first_batch, lr, frozen=(), inner_steps=1, betas=(0.9, 0.999),
                 eps=1e-8):
        self.model, self.guide, self.loss = model, guide, loss
        self.names, params = trainable_parameters(model, guide, loss, x, frozen, kwargs={"subsample": first_batch})
        declared = per_point_parameters(guide)
        if not declared:
            raise ValueError(f"the row-wise route needs a guide with per-point parameters it can read row by row "
                             f"(LocalMultivariateNormal, AutoNormal, or one declaring per_point_parameters()); "
                             f"{type(guide).__name__} has none: use optimizer='svi'")
        by_name = dict(zip(self.names, params))
        missing = [parameter.name for parameter in declared if parameter.name not in by_name]
        if missing:
            raise ValueError(f"the guide declares per-point parameters {missing} that the objective does not train")
        self.local = [(parameter.name, by_name[parameter.name], transform_to(parameter.constraint))
                      for parameter in declared]
        local_names = {name for name, _, _ in self.local}
        self.global_params = [tensor for name, tensor in zip(self.names, params) if name not in local_names]
        self.optimizer = (torch.optim.Adam(self.global_params, lr=lr, betas=betas, eps=eps)
                          if self.global_params else None)
        self.row_optimizers = [RowwiseAdam(tensor, lr, betas, eps) for _, tensor, _ in self.local]
        self.inner_steps = inner_steps
        self.name = "RowwiseAdam"
        self.scale = 1.0 / x.size(0)
        self.evaluations = 0
        self._points = None  # the batch's rows as the last evaluation saw them, for commit

    def step(self, x, kwargs, statistics=None):
        """Take one step on the batch ``kwargs["subsample"]``.

        ``statistics``: the run's running statistics (see :meth:`~pyro_esc.train.steppers.SVIStep.step`),
        read here; :meth:`commit` stores the batch's rows as the step's last evaluation saw them.

        :returns: ``(value, grad_norm)``: the loss the last evaluation reported (Pyro's scale; for
            EntropyELBO the running estimate) and the norm of the per-point loss's gradient there.
        """
        subsample = kwargs.get("subsample")
        if subsample is None:
            raise ValueError("the row-wise route takes minibatches (batch_size < N); for the full data "
                             "use optimizer='lbfgs'")
        with torch.no_grad():
            rows = [tensor.index_select(0, subsample) for _, tensor, _ in self.local]
        for inner in range(self.inner_steps):
            last = inner == self.inner_steps - 1
            leaves = [row.detach().requires_grad_() for row in rows]
            posterior = rows_posterior(self.guide, [transform(leaf) for (_, _, transform), leaf in
                                                    zip(self.local, leaves)])
            self.evaluations += 1
            value, optimised = self._evaluate(x, subsample, posterior, statistics)
            targets = leaves + (self.global_params if last else [])
            grads = torch.autograd.grad(optimised * self.scale, targets, allow_unused=True)
            grads = [torch.zeros_like(target) if grad is None else grad for target, grad in zip(targets, grads)]
            grad_norm = math.sqrt(sum(float(grad.square().sum()) for grad in grads))
            if not math.isfinite(grad_norm):
                raise NonFiniteObjectiveError(f"{type(self.loss).__name__}: the gradient is not finite "
                                              f"(norm {grad_norm})")
            rows = [optimizer.step(subsample, leaf.detach(), grad)
                    for optimizer, leaf, grad in zip(self.row_optimizers, leaves, grads)]
            if last and self.optimizer is not None:
                for param, grad in zip(self.global_params, grads[len(leaves):]):
                    param.grad = grad
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return float(value.detach()), grad_norm

    def commit(self, value, x, kwargs, statistics=None):
        """After a step: the batch's rows as the step's last evaluation saw them (before its update) stored in
        the running statistics, and an EntropyELBO's scales from them (O(batch), no evaluation); see
        :meth:`~pyro_esc.train.steppers.SVIStep.commit`."""
        if not isinstance(self.loss, EntropyELBO):
            return value, None
        points, self._points = self._points, None
        return _committed(self.loss.commit(self.model, self.guide, x, kwargs.get("subsample"), statistics,
                                           points=points))

    def _evaluate(self, x, subsample, posterior, statistics):
        if isinstance(self.loss, EntropyELBO):
            evaluated = self.loss.evaluate(self.model, self.guide, x, subsample, statistics, posterior=posterior)
            self._points = evaluated.points
            return evaluated.loss.detach(), evaluated.optimised
        optimised = self.loss.evaluate(self.model, self.guide, x, subsample, posterior=posterior)
        return optimised.detach(), optimised

    def set_lr(self, lr):
        for optimizer in self.row_optimizers:
            optimizer.lr = float(lr)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def current_lr(self):
        return self.row_optimizers[0].lr

    def reset(self):
        """Forget every optimiser state (moments and counts), keeping the parameters."""
        for optimizer in self.row_optimizers:
            optimizer.reset()
        if self.optimizer is not None:
            self.optimizer.state.clear()

    def state_dict(self):
        return {"rows": [optimizer.state_dict() for optimizer in self.row_optimizers],
                "global": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state):
        for optimizer, rows in zip(self.row_optimizers, state["rows"]):
            optimizer.load_state_dict(rows)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["global"])
