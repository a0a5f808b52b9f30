"""Amortised training warm-started from per-point posteriors: :func:`fit_amortized`.

Trained from its random initialisation, an amortised encoder and the dictionary it
learns settle in poorer local optima than per-point posteriors do: on the bars test
an :class:`~pyro_esc.AmortizedNormal` trained from scratch misses bars that
per-point full covariances (:class:`~pyro_esc.LocalMultivariateNormal`, L-BFGS)
find from one initialisation (BENCHMARKS.md, "Amortised inference").

:func:`fit_amortized` learns the model with per-point posteriors and then teaches the
encoder the posteriors that model implies, in three stages (a fourth is optional):

1. **dictionary**: W, lambda and sigma^2 learned by :func:`~pyro_esc.fit` with per-point
   posteriors (full covariances by default; skipped with ``learn_dictionary=False`` for a model
   trained already). The per-point ELBO bounds every amortised one at the same model from above,
   so this is the better objective for the model, and the one whose optima find the bars;
2. **match**: the per-point optima of the data and of ``match_points`` points drawn from the
   learned model are *solved* (:func:`~pyro_esc.solve_posteriors`, Newton's method, exact), and
   the encoder's heads are set by least squares to reproduce them
   (:meth:`~pyro_esc.AmortizedNormal.match_posteriors`): a linear solve, so the encoder starts
   near the per-point optimum for every point instead of at nu = 0;
3. **joint** (``joint=True`` only): encoder and dictionary together on the amortised objective
   until :func:`~pyro_esc.fit`'s convergence test (after ``encoder_steps`` L-BFGS steps of the
   encoder alone on the data): the model moves to a stationary point of the amortised ELBO;
4. **samples**: the encoder alone, the model fixed, for ``sample_steps`` Adam steps, each on
   ``model_samples`` points drawn afresh from the model and a ninth as many rows of the data.

Why stage 4 draws from the model: an encoder fitted to N points fits them better than new
points of the same source (the amortisation gap on held-out data exceeds the gap on the
training points), and x ~ p(x | W, lambda, sigma^2) is as cheap to draw as one likes. With every
model parameter fixed, each point's ELBO (:class:`~pyro_esc.AnalyticELBO` at the learned scales)
depends on the encoder alone, so the drawn points teach the encoder and change nothing else;
new points at every step leave nothing to memorise. The objective is noisy, hence Adam, its
learning rate decaying to 0 over the stage (half a cosine); the rows of the data in every batch
keep the encoder fitted to the data themselves where the model's distribution and the data's
differ (natural images).

Stages 2 and 4 optimise the encoder's own ELBO at the learned model (stage 2 through its
targets), and ``final_elbo`` is the amortised ELBO on the data: the encoder's posteriors with no
refinement. The per-point posteriors of stage 1 are removed from Pyro's param store once it ends
(they describe only the training points; :func:`~pyro_esc.encode` refits per-point posteriors
for any data). The defaults were chosen by the bars table of BENCHMARKS.md, "Amortised inference".
"""

import math
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import pyro
import torch
from tqdm.std import tqdm

from .._checks import check_int, check_positive
from .._pyro_internals import module_name, own_parameters
from ..evaluate.elbo import held_out_elbo
from ..infer.objectives import AnalyticELBO, EntropyELBO, NonFiniteObjectiveError
from ..infer.solver import solve_posteriors
from ..models.sparse_coding import MODEL_PARAMETERS, SparseCoding
from ..train.history import BATCH, EXACT, History
from ..train.loop import fit
from ..train.options import _prepare_data
from ..train.steppers import trainable_parameters
from ..train.standard_units import data_unit
from ..variational.guides import AmortizedNormal
from ..variational.registry import make_guide
from ..variational.semi_amortized import point_elbos

__all__ = ["AmortizedHistory", "fit_amortized", "DEFAULT_MATCH_POINTS", "DEFAULT_ENCODER_STEPS",
           "DEFAULT_MODEL_SAMPLES", "DEFAULT_SAMPLE_STEPS", "DEFAULT_SAMPLE_LR"]

#: Points drawn from the learned model whose solved posteriors the encoder is matched to (with up to as
#: many rows of the data) (BENCHMARKS.md, "Amortised inference").
DEFAULT_MATCH_POINTS = 20000
#: L-BFGS steps of the encoder alone on the data before the joint stage (``joint=True`` only).
DEFAULT_ENCODER_STEPS = 0
#: Points drawn afresh from the trained model at every step of the last stage (same table).
DEFAULT_MODEL_SAMPLES = 600
#: Adam steps of that stage (same table).
DEFAULT_SAMPLE_STEPS = 3000
#: Adam's initial learning rate in that stage (same table).
DEFAULT_SAMPLE_LR = 2e-3
#: The per-point guides the dictionary stage can learn with (the registry's names).
DICTIONARY_GUIDES = ("local-full", "local-diag")

#: fit options whose meaning :func:`fit_amortized` fixes stage by stage.
_STAGE_OPTIONS = ("train_dictionary", "train_model", "resume", "checkpoint", "checkpoint_every")


@dataclass
class AmortizedHistory:
    """What :func:`fit_amortized` did: one :class:`~pyro_esc.History` per training stage, and the ELBOs.

    ``dictionary`` is None when the dictionary stage was skipped, ``encoder`` and ``joint`` unless
    ``joint=True`` (``encoder`` also with ``encoder_steps=0``), ``samples`` when the model-samples
    stage was skipped. :attr:`converged` and :attr:`stop_reason` are those of :attr:`model_history`,
    the last stage that trained the model.
    """

    dictionary: Optional[History]
    encoder: Optional[History]
    joint: Optional[History]
    samples: Optional[History]
    #: The amortised ELBO per data point of the returned model and encoder (exact, the encoder's
    #: posteriors, at the model's lambda and sigma^2: :func:`~pyro_esc.held_out_elbo` on the data).
    final_elbo: float
    #: The same ELBO right after the match stage (None if it was skipped).
    match_elbo: Optional[float] = None
    #: The per-point optimum's ELBO per data point at the model the match stage saw (its targets; None
    #: if it was skipped or solved only some rows of the data).
    solved_elbo: Optional[float] = None

    @property
    def model_history(self):
        """The History of the last stage that trained the model: ``joint``, else ``dictionary`` (or None)."""
        return self.joint if self.joint is not None else self.dictionary

    @property
    def converged(self):
        return None if self.model_history is None else self.model_history.converged

    @property
    def stop_reason(self):
        return None if self.model_history is None else self.model_history.stop_reason

    @property
    def steps(self):
        """Steps per stage: ``{"dictionary": ..., "encoder": ..., "joint": ..., "samples": ...}`` (0: skipped)."""
        return {name: (history.step[-1] if history is not None and history.step else 0)
                for name, history in (("dictionary", self.dictionary), ("encoder", self.encoder),
                                      ("joint", self.joint), ("samples", self.samples))}


def fit_amortized(model, encoder, data, loss=None, *, learn_dictionary=True, dictionary_guide="local-full",
                  match_points=DEFAULT_MATCH_POINTS, joint=False, encoder_steps=DEFAULT_ENCODER_STEPS,
                  model_samples=DEFAULT_MODEL_SAMPLES, sample_steps=DEFAULT_SAMPLE_STEPS,
                  sample_lr=DEFAULT_SAMPLE_LR, n_init=1, seed=0, progress=True, **fit_options):
    """Train ``model`` and an amortised ``encoder`` on ``data``, warm-started from per-point posteriors.

    The stages (module docstring): per-point posteriors learn the model; the encoder's heads
    are set by least squares to the per-point optima solved at that model for the data and for
    points drawn from it; optionally encoder and dictionary together on the amortised objective
    (``joint=True``); then the encoder alone, with the model fixed, by Adam on points drawn afresh
    from the model at every step and rows of the data.

    Example::

        >>> import pyro
        >>> from pyro_esc import AmortizedNormal, SparseCoding, fit_amortized
        >>> from pyro_esc.data import bars
        >>> x, _ = bars(200, side=3, seed=0)
        >>> model = SparseCoding(9, 6)
        >>> encoder = AmortizedNormal(9, 6, hidden=(30,), covariance="full", skip=True)
        >>> with pyro.get_param_store().scope():
        ...     stages = fit_amortized(model, encoder, x, steps=50, match_points=500, sample_steps=20,
        ...                            progress=False)
        >>> stages.steps["samples"], stages.final_elbo > stages.dictionary.elbo[0]
        (20, True)

    :param model: a :class:`~pyro_esc.SparseCoding`.
    :param encoder: an :class:`~pyro_esc.AmortizedNormal`, built with ``skip=True``: the skip
        connection is what lets the match stage reproduce the near-linear part of the posterior means
        (without it a warning says so). An encoder that has not seen data yet first takes the data's
        standard unit (:func:`~pyro_esc.standard_units.data_unit`, its ``unit``), as in :func:`~pyro_esc.fit`.
    :param data: the data, (N, D) (as for :func:`~pyro_esc.fit`).
    :param loss: :class:`~pyro_esc.EntropyELBO` (default) or :class:`~pyro_esc.AnalyticELBO`: the
        objective of the fit stages (the other stages use the closed form at the fixed model).
    :param bool learn_dictionary: False skips the dictionary stage and starts from the model as it
        is (a model trained already, e.g. by a per-point guide, or loaded).
    :param str dictionary_guide: the per-point guide of the dictionary stage: ``"local-full"``
        (default; full covariances find every bar where diagonal ones do not) or ``"local-diag"``
        (``AutoNormal``: many latents or points, with ``batch_size`` for the EM route).
    :param int match_points: points drawn from the learned model for the match stage, joined by up
        to as many rows of the data (0 skips the stage).
    :param bool joint: run the joint stage (encoder and dictionary on the amortised objective).
    :param int encoder_steps: with ``joint``, L-BFGS steps of the encoder alone on the data first.
    :param int model_samples: points drawn afresh from the trained model at every step of the last
        stage, joined by ``model_samples // 9`` rows of the data (at most N) chosen at random (0 skips
        the stage).
    :param int sample_steps: Adam steps of the last stage (0 skips it; at most ``steps``).
    :param float sample_lr: Adam's learning rate at the start of the last stage; it decays to 0.
    :param int n_init: initialisations of the dictionary stage; the best final ELBO is kept.
    :param int seed: seed of every stage.
    :param bool progress: progress bars.
    :param fit_options: further :func:`~pyro_esc.fit` arguments for the dictionary and joint stages
        (``steps``, ``tol``, ``dtype``, ``batch_size``, ``annealing``, ``callback``, ...); ``steps`` is
        every stage's step limit, the last stage's and the encoder-only one's included.
    :returns: :class:`AmortizedHistory`.
    :raises ValueError: for a model that is not a SparseCoding, an encoder that is not an
        AmortizedNormal, a sampled objective, a fit option the stages set themselves, annealing
        with ``joint``, or ``learn_dictionary=False`` with a model that was never initialised.
    """

    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding, got {type(model).__name__}")
    if not isinstance(encoder, AmortizedNormal):
        raise ValueError(f"encoder must be a pyro_esc.AmortizedNormal, got {type(encoder).__name__}")
    loss = EntropyELBO() if loss is None else loss
    if not isinstance(loss, (EntropyELBO, AnalyticELBO)):
        raise ValueError(f"loss must be EntropyELBO or AnalyticELBO (the closed-form objectives every stage "
                         f"evaluates), got {type(loss).__name__}")
    if dictionary_guide not in DICTIONARY_GUIDES:
        raise ValueError(f"dictionary_guide must be one of {DICTIONARY_GUIDES}, got {dictionary_guide!r}")
    if joint is not True and joint is not False:
        raise ValueError(f"joint must be True or False, got {joint!r}")
    if joint and fit_options.get("annealing") is not None:
        raise ValueError("annealing: with joint=True the joint stage optimises the true amortised objective; "
                         "anneal the dictionary stage only (joint=False)")
    for name in _STAGE_OPTIONS:
        if name in fit_options:
            raise ValueError(f"{name} is set by fit_amortized stage by stage; it cannot be passed")
    match_points = check_int(match_points, "match_points", minimum=0)
    if match_points and not encoder.skip:
        warnings.warn("fit_amortized: the encoder has no skip connection, so the match stage's least-squares "
                      "start reproduces the solved posteriors poorly and the encoder ends far below them "
                      "(BENCHMARKS.md, 'Amortised inference'); build it with AmortizedNormal(..., skip=True)",
                      UserWarning, stacklevel=2)
    encoder_steps = check_int(encoder_steps, "encoder_steps", minimum=0)
    model_samples = check_int(model_samples, "model_samples", minimum=0)
    sample_steps = check_int(sample_steps, "sample_steps", minimum=0)
    sample_lr = check_positive(sample_lr, "sample_lr")
    n_init = check_int(n_init, "n_init", minimum=1)
    if not learn_dictionary and not bool(model.initialized):
        raise ValueError("learn_dictionary=False starts from the model's dictionary, but this model was never "
                         "trained or initialised; train it first or pass learn_dictionary=True")
    # Converted once (dtype, device), for every stage and for the drawn points to join.
    x = _prepare_data(data, fit_options.get("device"), fit_options.get("dtype"))
    common = dict(loss=loss, seed=seed, progress=progress)
    if not bool(encoder.matched):
        # A fresh encoder reads the data in their standard units, as fit's gradient routes train in them
        # (pyro_esc.standard_units): its weights then live in the range its defaults were chosen in.
        encoder.rescale(data_unit(x))

    dictionary_history = None
    if learn_dictionary:
        local = make_guide(dictionary_guide, model)
        try:
            dictionary_history = fit(model, local, x, n_init=n_init, **common, **fit_options)
        finally:
            _forget(local)
    limit = fit_options.get("steps")
    sample_steps = sample_steps if limit is None else min(sample_steps, limit)

    match_elbo = solved_elbo = None
    if match_points:
        solved_elbo = _match_stage(model, encoder, x, match_points, seed)
        match_elbo = held_out_elbo(model, encoder, x)

    encoder_history = joint_history = None
    if joint:
        # The batch options are the dictionary stage's; the encoder-only steps run on the full data.
        encoder_options = {key: value for key, value in fit_options.items()
                           if key not in ("steps", "tol", "gtol", "callback", "batch_size", "epochs", "annealing")}
        encoder_steps = encoder_steps if limit is None else min(encoder_steps, limit)
        if encoder_steps:
            # A fixed budget (no convergence test): the joint stage converges.
            encoder_history = fit(model, encoder, x, train_dictionary=False, steps=encoder_steps, tol=None,
                                  gtol=None, **common, **encoder_options)
        joint_history = fit(model, encoder, x, **common, **fit_options)

    samples_history = None
    if model_samples and sample_steps:
        samples_history = _model_samples_stage(model, encoder, x, model_samples, sample_steps, sample_lr, seed,
                                               progress)
    # The samples stage closes with the exact ELBO on the data; without it, evaluate it here.
    final_elbo = samples_history.eval_elbo[-1] if samples_history is not None else held_out_elbo(model, encoder, x)
    return AmortizedHistory(dictionary_history, encoder_history, joint_history, samples_history,
                            final_elbo=final_elbo, match_elbo=match_elbo, solved_elbo=solved_elbo)


def _match_stage(model, encoder, x, match_points, seed):
    """Stage 2: the encoder's heads by least squares onto solved per-point optima.

    Returns the optima's ELBO per point on x (None when x had more rows than ``match_points``, so
    that only some of them were solved).

    The points are up to ``match_points`` rows of the data (all N if fewer; else chosen at random)
    and ``match_points`` points drawn from the model. Their posteriors are solved in the encoder's
    family as far as it is one the solver has: diagonal for a diagonal encoder, full otherwise.
    """
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        rows = x if x.size(0) <= match_points else x.index_select(
            0, torch.randperm(x.size(0), device=x.device)[:match_points])
        drawn = model.sample(match_points)[1].to(x)
    points = torch.cat([rows, drawn])
    covariance = "diag" if encoder.covariance == "diag" else "full"
    solved = solve_posteriors(model, points, covariance)
    encoder.match_posteriors(points, solved.posterior)
    return float(solved.elbo[:rows.size(0)].mean()) if rows.size(0) == x.size(0) else None


def _model_samples_stage(model, encoder, x, model_samples, steps, lr, seed, progress):
    """Stage 4: the encoder alone, Adam on batches drawn afresh from the fixed model (and rows of the data).

    Each step's batch is ``model_samples`` points x ~ p(x | W, lambda, sigma^2) drawn anew
    together with ``model_samples // 9`` rows of the data chosen at random (at most N), so a
    tenth of every batch is data; the objective is the standard ELBO per point at the fixed model
    (``-AnalyticELBO().loss``, computed by :func:`~pyro_esc.semi_amortized.point_elbos` without a
    Pyro trace per step). Its expectation over the drawn points is the encoder's ELBO on the
    model's own distribution, a noisy objective in the encoder's weights: hence Adam with a
    learning rate decaying to 0 (half a cosine) rather than a line search. Every model
    parameter is frozen; the History records the batch ELBO at every step and, at the end,
    the exact ELBO on the data.
    """
    loss = AnalyticELBO()
    data_rows = min(x.size(0), model_samples // 9)
    pyro.set_rng_seed(seed)

    def next_batch():
        with torch.no_grad():
            drawn = model.sample(model_samples)[1].to(x)
        if not data_rows:
            return drawn
        rows = torch.randperm(x.size(0), device=x.device)[:data_rows]
        return torch.cat([x.index_select(0, rows), drawn])

    batch = next_batch()
    _, params = trainable_parameters(model, encoder, loss, batch, frozen=MODEL_PARAMETERS)
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.no_grad(), own_parameters(model):  # fixed for the whole stage
        dictionary, prior_scale, noise_var = (value.detach().to(x) for value in (
            model.dictionary, model.prior_scale, model.noise_var))

    def negative_elbo(points):
        # -AnalyticELBO().loss at the fixed model, through the per-point formula: no Pyro trace per step.
        value = -point_elbos(encoder.gaussian_posterior(points), points, dictionary, prior_scale, noise_var,
                             model.prior).sum()
        if not torch.isfinite(value):
            raise NonFiniteObjectiveError(f"the model-samples stage's ELBO is not finite ({float(value)})")
        return value

    # A torch optimiser other than L-BFGS: the route fit(optimizer=torch.optim.Adam) would report.
    history = History(num_data=batch.size(0), elbo_kind=BATCH, route="torch", optimizer="Adam")
    started = time.perf_counter()
    bar = tqdm(total=steps, disable=not progress, desc="fit (model samples)", dynamic_ncols=True)
    try:
        for step in range(1, steps + 1):
            # Half a cosine from lr to 0: the last steps average out the batches' noise.
            rate = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
            for group in optimizer.param_groups:
                group["lr"] = rate
            if step > 1:
                batch = next_batch()
            value = negative_elbo(batch)
            # Gradients of the encoder's weights only: the frozen model's .grad stays untouched.
            for param, grad in zip(params, torch.autograd.grad(value, params)):
                param.grad = grad
            optimizer.step()
            history.record(step, step, float(value.detach()), model, rate, (1.0, 1.0, 1.0), time.perf_counter() - started)
            if progress:
                bar.set_postfix(history.progress_postfix(), refresh=False)
            bar.update(1)
    finally:
        bar.close()
    for param in params:
        if not torch.isfinite(param).all():
            raise NonFiniteObjectiveError("the encoder's parameters became NaN or inf in the model-samples stage")
    history.stop_reason = f"step limit: {steps} steps"
    history.evaluations = steps
    history.eval_step.append(steps)
    history.eval_elbo.append(held_out_elbo(model, encoder, x))
    history.eval_kind = EXACT
    return history


def _forget(guide):
    """Remove a per-point guide's parameters from Pyro's param store (they are its alone)."""
    store = pyro.get_param_store()
    prefix = module_name(guide) + "."
    for name in [name for name in store.keys() if name.startswith(prefix)]:
        del store[name]
