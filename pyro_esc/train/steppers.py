"""Two of the routes of :func:`~pyro_esc.fit`: one optimisation step each (the third,
for O(batch) minibatch steps, is :mod:`pyro_esc.rowwise`).

- :class:`SVIStep`: Pyro's ``SVI`` with a ``pyro.optim`` optimiser, for
  minibatches and sampled objectives (any ``pyro.infer.ELBO``).
- :class:`TorchStep`: a ``torch.optim`` optimiser on the parameters that the
  objective reads, for the deterministic, closed-form objectives. Every step is
  ``optimizer.step(closure)``, so optimisers that need a closure (L-BFGS with
  its strong-Wolfe line search) work as well as those that do not. The
  parameters are found the way SVI finds them, by recording the param sites of
  one evaluation (Pyro's ``poutine.trace(param_only=True)``), so PyroModule
  parameters are read inside their Pyro context and stay in Pyro's param store.

The torch route minimises the loss per data point (Pyro's loss / N), which
keeps L-BFGS's first step and tolerances independent of N.
"""

import functools
import math
import warnings

import torch

from pyro import poutine
from pyro.infer.util import zero_grads

from .._pyro_internals import param_fullname, param_site_unconstrained, pending_optimizer_states
from ..infer.objectives import EntropyELBO, NonFiniteObjectiveError

#: Objective evaluations one L-BFGS step may spend in its line search.
LINE_SEARCH_EVALUATIONS = 25
#: L-BFGS memory: curvature pairs kept (BENCHMARKS.md, "Bars over sizes, noise levels and seeds").
LBFGS_HISTORY = 10


def lbfgs(params):
    """torch's L-BFGS as :func:`~pyro_esc.fit` uses it: one iteration per step, strong-Wolfe line search.

    ``max_eval`` must leave room for the line search: torch gives the line search
    at most ``max_eval - 1`` evaluations, so one iteration per step with the
    default ``max_eval`` would never search. Convergence is :func:`fit`'s test, so
    torch's own tolerances are off.
    """
    return torch.optim.LBFGS(params, lr=1.0, max_iter=1, max_eval=LINE_SEARCH_EVALUATIONS + 1,
                             history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe",
                             tolerance_grad=0.0, tolerance_change=0.0)


def optimizer_name(factory):
    """A readable name for an optimiser factory (a class, a partial of one, or a function)."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    if factory is lbfgs:
        return "LBFGS"
    return getattr(factory, "__name__", type(factory).__name__)


class SVIStep:
    """One ``SVI.step`` per training step (the route for minibatches and sampled objectives)."""

    route = "svi"

    def __init__(self, model, guide, loss, optim, x):
        from pyro.infer import SVI

        self.svi = SVI(model, guide, optim, loss=loss)
        self.model, self.guide, self.loss, self.x = model, guide, loss, x
        self.optim = optim
        self.name = type(optim).__name__
        self.evaluations = 0

    @property
    def names(self):
        """The param-store names an SVI step trains: its parameter capture of one evaluation."""
        with poutine.trace(param_only=True) as capture, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.loss.loss(self.model, self.guide, self.x)
        return list(capture.trace.nodes)

    def step(self, x, kwargs, statistics=None):
        """Take one step; return the value the objective reported and no gradient norm.

        The stepper protocol: ``step(x, kwargs, statistics)`` then ``commit(value, x, kwargs,
        statistics)``, where ``statistics`` is the run's state that the loop owns and passes in
        (an EntropyELBO's running minibatch statistics, :meth:`~pyro_esc.EntropyELBO.init_statistics`,
        or None). A step reads it; only ``commit`` changes it.
        """
        self.evaluations += 1
        if statistics is None:
            return self.svi.step(x, **kwargs), None
        # Pyro's SVI step (record the params read, backpropagate, let the optimiser step them), with the
        # objective evaluated at the state passed in rather than at one it would keep itself.
        with poutine.trace(param_only=True) as capture:
            evaluated = self.loss.evaluate(self.model, self.guide, x, kwargs.get("subsample"), statistics)
            evaluated.optimised.backward()
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        self.optim(params)
        zero_grads(params)
        return evaluated.loss.item(), None

    def commit(self, value, x, kwargs, statistics=None):
        """After a step: write the scales its parameters imply, if the objective eliminates them.

        The second half of the stepper protocol (``step`` -> ``commit``): each route commits its own
        scales (and stores the batch's rows in ``statistics``). Returns ``(value, noise_var)``: the
        objective to record (-N ELBO, after the commit where there is one) and the noise variance
        now in the model (None if this route set none).
        """
        if not isinstance(self.loss, EntropyELBO):
            return value, None
        return _committed(self.loss.commit(self.model, self.guide, x, kwargs.get("subsample"), statistics))

    def set_lr(self, lr):
        # PyroOptim keeps one torch optimiser per parameter, created on first sight; after a resume the
        # restored states wait for it, and their param_groups (with the lr of the step they were saved at)
        # would overwrite the new optimiser's: set the rate there too.
        self.optim.pt_optim_args["lr"] = lr
        pending = [state for state in pending_optimizer_states(self.optim).values()
                   if isinstance(state, dict) and "param_groups" in state]
        for optimizer_or_state in list(self.optim.optim_objs.values()) + pending:
            groups = (optimizer_or_state["param_groups"] if isinstance(optimizer_or_state, dict)
                      else optimizer_or_state.param_groups)
            for group in groups:
                group["lr"] = lr

    def current_lr(self):
        # The rate the optimisers use now (ClippedAdam decays it inside); the first
        # parameter's, as they share a schedule.
        for optimizer in self.optim.optim_objs.values():
            return float(optimizer.param_groups[0]["lr"])
        args = self.optim.pt_optim_args
        return args["lr"] if isinstance(args, dict) else float("nan")

    def reset(self):
        """Forget the optimiser's state (moments), keeping the parameters."""
        self.optim.optim_objs.clear()

    def state_dict(self):
        return self.optim.get_state()

    def load_state_dict(self, state):
        self.optim.set_state(state)


def _committed(terms):
    """``(value, noise_var)`` of the EntropyTerms a commit wrote: what :meth:`SVIStep.commit` and its kin return."""
    return float(-terms.num_data * terms.elbo), float(terms.noise_var)


def trainable_parameters(model, guide, loss, x, frozen=(), kwargs=None):
    """The (names, unconstrained tensors) that ``loss`` trains: its param sites that have a gradient.

    One evaluation is recorded as SVI records it. Parameters the objective reads
    but does not differentiate (EntropyELBO's lambda and sigma^2, which
    ``update`` sets) are left out, and so are the model's parameters named in
    ``frozen`` (attribute names, e.g. ``("raw_dictionary",)``). A guide
    that is a ``torch.nn.Module`` must have every trainable parameter among them,
    or it would silently never train: that is a ValueError.

    :param dict kwargs: the model's keyword arguments for the recorded evaluation, e.g.
        ``{"subsample": first_batch}`` so that no graph over all N points is built.
    """
    with poutine.trace(param_only=True) as capture, warnings.catch_warnings():
        # A minibatch (kwargs) without running statistics computes the other rows afresh; that is intended here.
        warnings.simplefilter("ignore", RuntimeWarning)
        value = loss.differentiable_loss(model, guide, x, **(kwargs or {}))
    frozen = {param_fullname(model, name) for name in frozen}
    sites = [(name, param_site_unconstrained(site)) for name, site in capture.trace.nodes.items()
             if site["type"] == "param"]
    trainable = [(name, tensor) for name, tensor in sites if name not in frozen]
    candidates = [(name, tensor) for name, tensor in trainable if tensor.requires_grad]
    grads = torch.autograd.grad(value, [tensor for _, tensor in candidates], allow_unused=True)
    kept = [(name, tensor) for (name, tensor), grad in zip(candidates, grads) if grad is not None]
    if isinstance(guide, torch.nn.Module):
        seen = {id(tensor) for _, tensor in sites}
        missed = [name for name, param in guide.named_parameters() if param.requires_grad and id(param) not in seen]
        if missed:
            raise ValueError(f"the guide's parameters {missed} are not read through Pyro's param store, so they "
                             f"would never be trained; make the guide a PyroModule (read them inside its Pyro "
                             f"context, e.g. with @pyro_method) or register them with pyro.module(...)")
    if not kept:
        raise ValueError(f"{type(loss).__name__} has no parameter to train for this model and guide")
    # A canonical order (by name), so that an optimiser's flat state (L-BFGS's curvature pairs)
    # lines up with the parameters again after a checkpoint is restored.
    kept.sort(key=lambda item: item[0])
    return [name for name, _ in kept], [tensor for _, tensor in kept]


class TorchStep:
    """One ``optimizer.step(closure)`` per training step on the objective's own parameters.

    :param factory: ``factory(params) -> torch.optim.Optimizer``: a torch optimiser class,
        a ``functools.partial`` of one with its arguments, or :func:`lbfgs`.
    :param frozen: param-store names to leave untrained.
    """

    route = "torch"

    def __init__(self, model, guide, loss, x, factory, frozen=()):
        self.model, self.guide, self.loss = model, guide, loss
        self.names, self.params = trainable_parameters(model, guide, loss, x, frozen)
        self.optimizer = factory(self.params)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must build a torch.optim.Optimizer from the parameters, got "
                             f"{type(self.optimizer).__name__}")
        self.name = type(self.optimizer).__name__
        # Only L-BFGS evaluates the point a step starts from twice (see closure); for other optimisers
        # remembering each evaluation would be a copy of every parameter per step for nothing.
        self._reuse = isinstance(self.optimizer, torch.optim.LBFGS)
        self.scale = 1.0 / x.size(0)
        self.evaluations = 0
        self.grad_norm = math.nan
        self._last = None  # (parameters, annealing weights, value, gradients) of the last evaluation
        self._last_terms = None  # EntropyELBO's terms of that evaluation (see current_terms)

    def step(self, x, kwargs, statistics=None):
        """Take one step; return the loss at the start of the step (Pyro's scale) and the gradient norm.

        The gradient norm is that of the per-point loss at the step's last evaluation. ``statistics``:
        see :meth:`SVIStep.step`.
        """
        start, penalised = [], []

        def closure():
            self.optimizer.zero_grad()
            if self._reuse and not kwargs and self._repeat_last():
                # torch's L-BFGS evaluates the point a step starts from, which is the point its previous
                # line search accepted and (nearly always) evaluated last: reuse that evaluation.
                start.append(float(self._last[2]))
                return self._last[2].clone()
            self.evaluations += 1
            terms = None
            try:
                if isinstance(self.loss, EntropyELBO):
                    evaluated = self.loss.evaluate(self.model, self.guide, x, kwargs.get("subsample"), statistics)
                    value, terms = evaluated.optimised * self.scale, evaluated.terms
                else:
                    value = self.loss.differentiable_loss(self.model, self.guide, x, **kwargs) * self.scale
                value.backward()
                grad_norm = self._grad_norm()
                problem = None if bool(torch.isfinite(value)) and math.isfinite(grad_norm) else \
                    f"{type(self.loss).__name__} is {float(value.detach()):g} with gradient norm {grad_norm:g}"
            except NonFiniteObjectiveError as error:
                problem = str(error)
            if not start:
                if problem is not None:  # the point the step starts from: a real failure
                    raise NonFiniteObjectiveError(problem)
                start.append(float(value.detach()))
            if problem is not None:
                # A trial point of the line search that went too far (a scale underflowed to 0): a
                # large finite value with no gradient makes the search step back, where inf or NaN
                # would break its interpolation.
                self.optimizer.zero_grad(set_to_none=False)
                penalised.append(True)
                return torch.tensor(abs(start[0]) * 1e3 + 1e6)
            self.grad_norm = grad_norm
            if self._reuse and not kwargs:
                self._remember(value, terms)
            return value

        value = self.optimizer.step(closure)
        if penalised:
            # The direction ran into a region where the objective is not finite: its curvature
            # memory points the wrong way (steps then shrink to nothing while the gradient stays
            # large). Forget it; the next step starts from steepest descent with a cautious length.
            self.reset()
        return float(value.detach()) / self.scale, self.grad_norm

    def commit(self, value, x, kwargs, statistics=None):
        """After a step: as :meth:`SVIStep.commit`, reusing the terms L-BFGS evaluated last where it can."""
        if not isinstance(self.loss, EntropyELBO):
            # The step reported the value it started from; record the one it reached.
            return self.loss.loss(self.model, self.guide, x, **kwargs), None
        # L-BFGS has (nearly always) just evaluated the point it stopped at: write those terms.
        evaluated = self.current_terms() if not kwargs else None
        return _committed(self.loss.commit(self.model, self.guide, x, kwargs.get("subsample"), statistics,
                                           terms=evaluated))

    def _flat_parameters(self):
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _remember(self, value, terms=None):
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        self._last = (self._flat_parameters(), getattr(self.loss, "betas", None), value.detach(), grads)
        # Detached: remembering must not keep the evaluation's autograd graph alive.
        self._last_terms = None if terms is None else type(terms)(
            *(item.detach() if isinstance(item, torch.Tensor) else item for item in terms))

    def current_terms(self):
        """EntropyELBO's terms at the current parameters if the last evaluation was there, else None.

        An L-BFGS step ends on the point its line search accepted, which (nearly always) it has just
        evaluated: :meth:`commit` hands these terms to ``EntropyELBO.commit`` instead of
        evaluating the same point again.
        """
        if self._last is None or self._last_terms is None:
            return None
        if not torch.equal(self._last[0], self._flat_parameters()):
            return None
        return self._last_terms

    def _repeat_last(self):
        # Whether the parameters (and annealing weights) are exactly those of the last evaluation;
        # if so, put its gradients back. Equal inputs give equal outputs: the objective is deterministic.
        if self._last is None:
            return False
        parameters, betas, _, grads = self._last
        if betas != getattr(self.loss, "betas", None) or not torch.equal(parameters, self._flat_parameters()):
            return False
        for param, grad in zip(self.params, grads):
            param.grad = None if grad is None else grad.clone()
        return True

    def _grad_norm(self):
        with torch.no_grad():
            return float(torch.stack([p.grad.square().sum() for p in self.params if p.grad is not None]).sum().sqrt())

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def current_lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def reset(self):
        """Forget the optimiser's state (L-BFGS's curvature pairs, Adam's moments), keeping the parameters."""
        self.optimizer.state.clear()
        self._last = self._last_terms = None

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)
