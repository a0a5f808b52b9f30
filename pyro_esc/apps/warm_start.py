"""Amortised training warm-started from per-point posteriors: :func:`fit_amortized`.

Trained from its random initialisation, an amortised encoder and the dictionary it
learns settle in poorer local optima than per-point posteriors do: on the bars test
an :class:`~pyro_esc.AmortizedNormal` trained from scratch misses bars that
per-point full covariances (:class:`~pyro_esc.LocalMultivariateNormal`, L-BFGS)
find from one initialisation (BENCHMARKS.md, "Amortised inference"). Our reading
(not measured): early in training the encoder's posteriors are poor for every
point, and the dictionary commits to what such posteriors can explain.

:func:`fit_amortized` lets the per-point posteriors choose where the amortised
objective is optimised from, in four stages (three :func:`~pyro_esc.fit` calls, then Adam):

1. **dictionary**: W (and lambda, sigma^2) learned with per-point full-covariance
   posteriors, L-BFGS to convergence (skipped with ``learn_dictionary=False``, for
   a model trained already);
2. **encoder**: the encoder alone at that dictionary (``train_dictionary=False``)
   for ``encoder_steps`` L-BFGS steps, so that the joint stage starts from
   posteriors close to the per-point ones instead of the encoder's initialisation;
3. **joint**: encoder and dictionary together on the amortised objective, L-BFGS
   until ``fit``'s convergence test holds;
4. **samples**: the encoder alone again, at the model the joint stage learned (W,
   lambda, sigma^2 all fixed), for ``sample_steps`` Adam steps, each on
   ``model_samples`` points drawn afresh from that model and a ninth as many rows of
   the data.

Stage 3 fits the encoder to N points, and an encoder with more weights than the
data pin down fits them better than it fits new points of the same source: its
posteriors on held-out data fall further below the per-point optimum (the
amortisation gap) than on the training points. Stage 4 shows it the model's own
distribution, which is what new data come from if the model fits: x ~ p(x | W,
lambda, sigma^2) is as cheap to draw as one likes. With every model parameter
fixed, each point's ELBO (:class:`~pyro_esc.AnalyticELBO` at the learned scales)
depends on the encoder alone, so the drawn points teach the encoder and change
nothing else: the dictionary, lambda and sigma^2 are those of stage 3.

Stage 4 is the one stochastic stage. Its objective is the encoder's expected ELBO
over the model's distribution, and new points at every step keep the encoder from
fitting any finite set of them: a fixed set of drawn points, however large, is
fitted better than new points are (BENCHMARKS.md, "Amortised inference"). A noisy
objective is Adam's: its learning rate decays to 0 over the stage (half a cosine),
and the rows of the data in every batch keep the encoder fitted to the data
themselves where the model's distribution and the data's differ (natural images).

The per-point stage only picks the starting point: stages 3 and 4 optimise the
amortised ELBO itself, and ``final_elbo`` is its value on the data, the encoder's
posteriors with no refinement. The per-point posteriors are removed from Pyro's
param store once their stage ends (they describe only the training points;
:func:`~pyro_esc.encode` refits per-point posteriors for any data).
"""

import math
import time
from dataclasses import dataclass
from typing import Optional

import pyro
import torch
from tqdm.std import tqdm

from .._checks import check_int, check_positive
from .._pyro_internals import module_name
from ..evaluate.elbo import held_out_elbo
from ..infer.objectives import AnalyticELBO, EntropyELBO, NonFiniteObjectiveError
from ..models.sparse_coding import MODEL_PARAMETERS, SparseCoding
from ..train.history import BATCH, EXACT, History
from ..train.loop import fit
from ..train.options import _prepare_data
from ..train.steppers import trainable_parameters
from ..variational.guides import AmortizedNormal, LocalMultivariateNormal

__all__ = ["AmortizedHistory", "fit_amortized", "DEFAULT_ENCODER_STEPS", "DEFAULT_MODEL_SAMPLES",
           "DEFAULT_SAMPLE_STEPS", "DEFAULT_SAMPLE_LR"]

#: L-BFGS steps of the encoder-only stage of :func:`fit_amortized` (BENCHMARKS.md, "Amortised inference").
DEFAULT_ENCODER_STEPS = 2000
#: Points drawn afresh from the trained model at every step of the last stage of :func:`fit_amortized`
#: (same table).
DEFAULT_MODEL_SAMPLES = 900
#: Adam steps of that stage (same table).
DEFAULT_SAMPLE_STEPS = 40000
#: Adam's initial learning rate in that stage (same table).
DEFAULT_SAMPLE_LR = 1e-3

#: fit options whose meaning :func:`fit_amortized` fixes stage by stage.
_STAGE_OPTIONS = ("train_dictionary", "train_model", "resume", "checkpoint", "checkpoint_every")


@dataclass
class AmortizedHistory:
    """The :class:`~pyro_esc.History` objects of :func:`fit_amortized`, one per stage, and the final ELBO.

    ``dictionary`` is None when the dictionary stage was skipped, ``samples`` when the
    model-samples stage was. :attr:`converged` and :attr:`stop_reason` are the joint
    stage's, the last to train the model.
    """

    dictionary: Optional[History]
    encoder: History
    joint: History
    samples: Optional[History]
    #: The amortised ELBO per data point of the returned model and encoder (exact, the encoder's
    #: posteriors, at the model's lambda and sigma^2: :func:`~pyro_esc.held_out_elbo` on the data).
    final_elbo: float

    @property
    def converged(self):
        return self.joint.converged

    @property
    def stop_reason(self):
        return self.joint.stop_reason

    @property
    def steps(self):
        """Steps per stage: ``{"dictionary": ..., "encoder": ..., "joint": ..., "samples": ...}`` (0: skipped)."""
        return {name: (history.step[-1] if history is not None and history.step else 0)
                for name, history in (("dictionary", self.dictionary), ("encoder", self.encoder),
                                      ("joint", self.joint), ("samples", self.samples))}


def fit_amortized(model, encoder, data, loss=None, *, learn_dictionary=True, encoder_steps=DEFAULT_ENCODER_STEPS,
                  model_samples=DEFAULT_MODEL_SAMPLES, sample_steps=DEFAULT_SAMPLE_STEPS,
                  sample_lr=DEFAULT_SAMPLE_LR, n_init=1, seed=0, progress=True, **fit_options):
    """Train ``model`` and an amortised ``encoder`` on ``data``, warm-started from per-point posteriors.

    The four stages (module docstring): per-point full covariances learn the dictionary;
    the encoder alone learns to produce their posteriors at that dictionary; both are
    trained together on the amortised objective until convergence; then the encoder
    alone, with the model fixed, on points drawn afresh from the model at every step and
    rows of the data. The first three are :func:`~pyro_esc.fit` calls on the full data with
    ``loss`` (L-BFGS); the last optimises :class:`~pyro_esc.AnalyticELBO` at the fixed model
    with Adam (a batch objective: its points change at every step).

    :param model: a :class:`~pyro_esc.SparseCoding`.
    :param encoder: an :class:`~pyro_esc.AmortizedNormal`; a wider one than its default hidden layer
        fits new data better at low noise (BENCHMARKS.md, "Amortised inference").
    :param data: the data, (N, D) (as for :func:`~pyro_esc.fit`).
    :param loss: :class:`~pyro_esc.EntropyELBO` (default) or :class:`~pyro_esc.AnalyticELBO`: a
        deterministic objective on the full data, which the first three stages optimise.
    :param bool learn_dictionary: False skips the per-point stage and starts from the model's
        current dictionary (a model trained already, e.g. by a per-point guide, or loaded).
    :param int encoder_steps: L-BFGS steps of the encoder-only stage (0 skips it; at most ``steps``).
    :param int model_samples: points drawn afresh from the trained model at every step of the last
        stage, joined by ``model_samples // 9`` rows of the data (at most N) chosen at random (0 skips
        the stage).
    :param int sample_steps: Adam steps of the last stage (0 skips it; at most ``steps``).
    :param float sample_lr: Adam's learning rate at the start of the last stage; it decays to 0.
    :param int n_init: initialisations of the per-point stage; the best final ELBO is kept.
    :param int seed: seed of every stage.
    :param bool progress: progress bars.
    :param fit_options: further :func:`~pyro_esc.fit` arguments for the dictionary and joint stages
        (``steps``, ``tol``, ``dtype``, ``finish_in_float64``, ``callback``, ...); ``steps`` is every
        stage's step limit, the two encoder-only stages' included.
    :returns: :class:`AmortizedHistory`.
    :raises ValueError: for a model that is not a SparseCoding, an encoder that is not an
        AmortizedNormal, a sampled objective or minibatches, a fit option the stages set
        themselves, or ``learn_dictionary=False`` with a model that was never initialised.
    """

    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding, got {type(model).__name__}")
    if not isinstance(encoder, AmortizedNormal):
        raise ValueError(f"encoder must be a pyro_esc.AmortizedNormal, got {type(encoder).__name__}")
    loss = EntropyELBO() if loss is None else loss
    if not isinstance(loss, (EntropyELBO, AnalyticELBO)):
        raise ValueError(f"loss must be EntropyELBO or AnalyticELBO (its three fit stages run L-BFGS on "
                         f"the exact objective), got {type(loss).__name__}")
    if fit_options.get("batch_size") is not None or fit_options.get("epochs") is not None:
        raise ValueError("fit_amortized's fit stages train on the full data (L-BFGS); batch_size and epochs are not "
                         "supported")
    if fit_options.get("annealing") is not None:
        raise ValueError("annealing: fit_amortized optimises the true objective in every stage; anneal with "
                         "fit on one guide instead")
    for name in _STAGE_OPTIONS:
        if name in fit_options:
            raise ValueError(f"{name} is set by fit_amortized stage by stage; it cannot be passed")
    if fit_options.get("optimizer", "lbfgs") not in ("lbfgs", "auto"):
        raise ValueError(f"optimizer: fit_amortized's fit stages train with L-BFGS, got {fit_options['optimizer']!r}")
    fit_options["optimizer"] = "lbfgs"
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

    dictionary_history = None
    if learn_dictionary:
        local = LocalMultivariateNormal(model)
        try:
            dictionary_history = fit(model, local, x, n_init=n_init, **common, **fit_options)
        finally:
            _forget(local)
    encoder_options = {key: value for key, value in fit_options.items()
                       if key not in ("steps", "tol", "gtol", "callback")}
    limit = fit_options.get("steps")
    encoder_steps = encoder_steps if limit is None else min(encoder_steps, limit)
    sample_steps = sample_steps if limit is None else min(sample_steps, limit)
    if encoder_steps:
        # A fixed budget (no convergence test): this stage only brings the encoder near the
        # per-point posteriors; the joint stage converges.
        encoder_history = fit(model, encoder, x, train_dictionary=False, steps=encoder_steps, tol=None, gtol=None,
                              **common, **encoder_options)
    else:
        encoder_history = History()
    joint_history = fit(model, encoder, x, **common, **fit_options)

    samples_history = None
    if model_samples and sample_steps:
        samples_history = _model_samples_stage(model, encoder, x, model_samples, sample_steps, sample_lr, seed,
                                               progress)
    # The samples stage closes with the exact ELBO on the data; without it, evaluate it here.
    final_elbo = samples_history.eval_elbo[-1] if samples_history is not None else held_out_elbo(model, encoder, x)
    return AmortizedHistory(dictionary_history, encoder_history, joint_history, samples_history,
                            final_elbo=final_elbo)


def _model_samples_stage(model, encoder, x, model_samples, steps, lr, seed, progress):
    """Stage 4: the encoder alone, Adam on batches drawn afresh from the fixed model (and rows of the data).

    Each step's batch is ``model_samples`` points x ~ p(x | W, lambda, sigma^2) drawn anew
    together with ``model_samples // 9`` rows of the data chosen at random (at most N), so a
    tenth of every batch is data; the objective is :class:`~pyro_esc.AnalyticELBO` per point at
    the fixed model. Its expectation over the drawn points is the encoder's ELBO on the
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
            value = loss.differentiable_loss(model, encoder, batch)  # raises NonFiniteObjectiveError on NaN
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
