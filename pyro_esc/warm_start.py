"""Amortised training warm-started from per-point posteriors: :func:`fit_amortized`.

Trained from its random initialisation, an amortised encoder and the dictionary it
learns settle in poorer local optima than per-point posteriors do: on the bars test
an :class:`~pyro_esc.AmortizedNormal` trained from scratch misses bars that
per-point full covariances (:class:`~pyro_esc.LocalMultivariateNormal`, L-BFGS)
find from one initialisation (BENCHMARKS.md, "Amortised inference"). Our reading
(not measured): early in training the encoder's posteriors are poor for every
point, and the dictionary commits to what such posteriors can explain.

:func:`fit_amortized` lets the per-point posteriors choose where the amortised
objective is optimised from, in three :func:`~pyro_esc.fit` calls:

1. **dictionary**: W (and lambda, sigma^2) learned with per-point full-covariance
   posteriors, L-BFGS to convergence (skipped with ``learn_dictionary=False``, for
   a model trained already);
2. **encoder**: the encoder alone at that dictionary (``train_dictionary=False``)
   for ``encoder_steps`` L-BFGS steps, so that the joint stage starts from
   posteriors close to the per-point ones instead of the encoder's initialisation;
3. **joint**: encoder and dictionary together on the amortised objective, L-BFGS
   until ``fit``'s convergence test holds.

The last stage optimises the amortised ELBO itself, and ``final_elbo`` is its value,
the encoder's posteriors with no refinement: the per-point stage only picks the
starting point. Its posteriors are removed from Pyro's param store once it ends
(they describe only the training points; :func:`~pyro_esc.encode` refits
per-point posteriors for any data).
"""

from dataclasses import dataclass
from typing import Optional

import pyro

from ._checks import check_int
from ._pyro_internals import module_name
from .guides import AmortizedNormal, LocalMultivariateNormal
from .history import History
from .model import SparseCoding
from .objectives import AnalyticELBO, EntropyELBO

__all__ = ["AmortizedHistory", "fit_amortized", "DEFAULT_ENCODER_STEPS"]

#: L-BFGS steps of the encoder-only stage of :func:`fit_amortized` (BENCHMARKS.md, "Amortised inference").
DEFAULT_ENCODER_STEPS = 2000

#: fit options whose meaning :func:`fit_amortized` fixes stage by stage.
_STAGE_OPTIONS = ("train_dictionary", "train_model", "resume", "checkpoint", "checkpoint_every")


@dataclass
class AmortizedHistory:
    """The three :class:`~pyro_esc.History` objects of :func:`fit_amortized`, one per stage.

    ``dictionary`` is None when the dictionary stage was skipped. :attr:`final_elbo`,
    :attr:`converged` and :attr:`stop_reason` are the joint stage's: the amortised ELBO
    per data point and how its optimisation ended.
    """

    dictionary: Optional[History]
    encoder: History
    joint: History

    @property
    def final_elbo(self):
        """The amortised ELBO per data point after the joint stage (exact, the encoder's posteriors)."""
        return self.joint.final_elbo

    @property
    def converged(self):
        return self.joint.converged

    @property
    def stop_reason(self):
        return self.joint.stop_reason

    @property
    def steps(self):
        """Steps per stage: ``{"dictionary": ..., "encoder": ..., "joint": ...}`` (0 for a skipped stage)."""
        return {name: (history.step[-1] if history is not None and history.step else 0)
                for name, history in (("dictionary", self.dictionary), ("encoder", self.encoder),
                                      ("joint", self.joint))}


def fit_amortized(model, encoder, data, loss=None, *, learn_dictionary=True, encoder_steps=DEFAULT_ENCODER_STEPS,
                  n_init=1, seed=0, progress=True, **fit_options):
    """Train ``model`` and an amortised ``encoder`` on ``data``, warm-started from per-point posteriors.

    The three stages (module docstring): per-point full covariances learn the dictionary;
    the encoder alone learns to produce their posteriors at that dictionary; then both
    are trained together on the amortised objective until convergence. Every stage is a
    :func:`~pyro_esc.fit` call on the full data with ``loss``, which takes the L-BFGS route.

    :param model: a :class:`~pyro_esc.SparseCoding`.
    :param encoder: an :class:`~pyro_esc.AmortizedNormal`.
    :param data: the data, (N, D) (as for :func:`~pyro_esc.fit`).
    :param loss: :class:`~pyro_esc.EntropyELBO` (default) or :class:`~pyro_esc.AnalyticELBO`: a
        deterministic objective on the full data, which every stage optimises.
    :param bool learn_dictionary: False skips the per-point stage and starts from the model's
        current dictionary (a model trained already, e.g. by a per-point guide, or loaded).
    :param int encoder_steps: L-BFGS steps of the encoder-only stage (0 skips it; at most ``steps``).
    :param int n_init: initialisations of the per-point stage; the best final ELBO is kept.
    :param int seed: seed of every stage.
    :param bool progress: progress bars.
    :param fit_options: further :func:`~pyro_esc.fit` arguments for the dictionary and joint stages
        (``steps``, ``tol``, ``dtype``, ``finish_in_float64``, ``callback``, ...); ``steps`` is every
        stage's step limit, the encoder stage's included.
    :returns: :class:`AmortizedHistory`.
    :raises ValueError: for a model that is not a SparseCoding, an encoder that is not an
        AmortizedNormal, a sampled objective or minibatches, a fit option the stages set
        themselves, or ``learn_dictionary=False`` with a model that was never initialised.
    """
    from .training import fit

    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding, got {type(model).__name__}")
    if not isinstance(encoder, AmortizedNormal):
        raise ValueError(f"encoder must be a pyro_esc.AmortizedNormal, got {type(encoder).__name__}")
    loss = EntropyELBO() if loss is None else loss
    if not isinstance(loss, (EntropyELBO, AnalyticELBO)):
        raise ValueError(f"loss must be EntropyELBO or AnalyticELBO (every stage runs L-BFGS on the exact "
                         f"objective), got {type(loss).__name__}")
    if fit_options.get("batch_size") is not None or fit_options.get("epochs") is not None:
        raise ValueError("fit_amortized trains on the full data (L-BFGS); batch_size and epochs are not supported")
    if fit_options.get("annealing") is not None:
        raise ValueError("annealing: fit_amortized optimises the true objective in every stage; anneal with "
                         "fit on one guide instead")
    for name in _STAGE_OPTIONS:
        if name in fit_options:
            raise ValueError(f"{name} is set by fit_amortized stage by stage; it cannot be passed")
    if fit_options.get("optimizer", "lbfgs") not in ("lbfgs", "auto"):
        raise ValueError(f"optimizer: fit_amortized trains with L-BFGS, got {fit_options['optimizer']!r}")
    fit_options["optimizer"] = "lbfgs"
    encoder_steps = check_int(encoder_steps, "encoder_steps", minimum=0)
    n_init = check_int(n_init, "n_init", minimum=1)
    if not learn_dictionary and not bool(model.initialized):
        raise ValueError("learn_dictionary=False starts from the model's dictionary, but this model was never "
                         "trained or initialised; train it first or pass learn_dictionary=True")
    common = dict(loss=loss, seed=seed, progress=progress)

    dictionary_history = None
    if learn_dictionary:
        local = LocalMultivariateNormal(model)
        try:
            dictionary_history = fit(model, local, data, n_init=n_init, **common, **fit_options)
        finally:
            _forget(local)
    encoder_options = {key: value for key, value in fit_options.items()
                       if key not in ("steps", "tol", "gtol", "callback")}
    limit = fit_options.get("steps")
    encoder_steps = encoder_steps if limit is None else min(encoder_steps, limit)
    if encoder_steps:
        # A fixed budget (no convergence test): this stage only brings the encoder near the
        # per-point posteriors; the joint stage converges.
        encoder_history = fit(model, encoder, data, train_dictionary=False, steps=encoder_steps, tol=None, gtol=None,
                              **common, **encoder_options)
    else:
        encoder_history = History()
    joint_history = fit(model, encoder, data, **common, **fit_options)
    return AmortizedHistory(dictionary_history, encoder_history, joint_history)


def _forget(guide):
    """Remove a per-point guide's parameters from Pyro's param store (they are its alone)."""
    store = pyro.get_param_store()
    prefix = module_name(guide) + "."
    for name in [name for name in store.keys() if name.startswith(prefix)]:
        del store[name]
