"""The paper's experiments, as functions that train, measure and draw.

Each ``run_*`` function trains with :func:`~pyro_esc.fit` and returns a result
record (:class:`BarsResult`, :class:`PatchesResult`): the metrics as fields,
with :meth:`~BarsResult.metrics` giving them as a JSON-ready dict, plus the
learned dictionary and the training history. :func:`run_bars` also draws its
fields given an output folder. :func:`reproduce` runs them all and writes the
figures and ``metrics.json``; the ``pyro-esc`` command line calls these
functions.

Sizes: ``quick=True`` is a reduced reproduction (minutes on a laptop CPU); the
environment variable ``PYRO_ESC_FAST=1`` shrinks everything further, for
tests and notebook smoke runs only.
"""

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field, fields as dataclass_fields
from typing import Dict, List, Optional

import torch

import pyro
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from . import plots
from .apps.warm_start import fit_amortized
from .data import Whitening, bars, image_patches
from .evaluate.elbo import reference_elbo
from .evaluate.metrics import bars_recovery, code_sparseness, field_spread
from .infer.objectives import AnalyticELBO, EntropyELBO
from .models.sparse_coding import SparseCoding
from .train.em import EM
from .train.history import History
from .train.loop import fit
from .train.options import auto_route
from .train.recipes import AMORTIZED_LR, bars_optimizer, decaying_adam  # noqa: F401 - public here too
from .variational.guides import AmortizedNormal
from .variational.posterior import gaussian_posterior
from .variational.registry import GUIDES as GUIDE_REGISTRY
from .variational.registry import make_guide as registered_guide

#: Guides by the names the command line uses (the registry, :mod:`pyro_esc.variational.registry`).
GUIDES = tuple(GUIDE_REGISTRY)
#: Objectives by the names the command line uses.
OBJECTIVES = ("entropy", "analytic", "trace", "trace-meanfield")

GUIDE_LABELS = {name: kind.label for name, kind in GUIDE_REGISTRY.items()}


def fast_mode():
    """Whether ``PYRO_ESC_FAST`` asks for smoke-test sizes."""
    return os.environ.get("PYRO_ESC_FAST", "") not in ("", "0")


def make_guide(name, model, hidden=(100,), **encoder_options):
    """A guide for ``model`` by name (see :data:`GUIDES`); ``hidden`` and ``encoder_options`` (e.g.
    ``skip=True``) set an amortised guide's encoder."""
    if name in GUIDE_REGISTRY and GUIDE_REGISTRY[name].amortized:
        return registered_guide(name, model, hidden=hidden, **encoder_options)
    return registered_guide(name, model, **encoder_options)


def make_loss(name):
    """An objective by name (see :data:`OBJECTIVES`); annealing is set by :func:`~pyro_esc.fit`."""
    if name == "entropy":
        return EntropyELBO()
    if name == "analytic":
        return AnalyticELBO()
    if name == "trace":
        return Trace_ELBO()
    if name == "trace-meanfield":
        return TraceMeanField_ELBO()
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")


def _annealing_label(loss):
    # What fit set on the loss (only EntropyELBO anneals), for the metrics JSON.
    annealing = getattr(loss, "annealing", None)
    return None if annealing is None else repr(annealing)


def _seed_everything(seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)


# ------------------------------------------------------------------- results

#: Field metadata of what a run returns but :meth:`metrics` leaves out (tensors, histories).
_NOT_METRICS = {"metric": False}


def _metrics(result):
    # The metric fields of a result dataclass, in field order, copied so that editing the dict leaves
    # the result alone.
    return {item.name: copy.deepcopy(getattr(result, item.name))
            for item in dataclass_fields(result) if item.metadata.get("metric", True)}


@dataclass(frozen=True, eq=False)
class BarsResult:
    """What :func:`run_bars` returns: settings and metrics, the learned fields and the history.

    Every field but the last two is a plain number, string, list or None;
    :meth:`metrics` returns those as a dict (the content of ``bars_metrics.json``).
    """

    guide: str
    objective: str
    n: int
    side: int
    noise: float
    #: Steps taken (the last step of the kept run).
    steps: int
    #: The Adam recipe's initial learning rate, None on the L-BFGS route.
    lr: Optional[float]
    batch_size: Optional[int]
    #: Seed of the data (and, by default, of the initialisation).
    seed: int
    #: Seed of the initialisation (restart i of ``n_init`` uses ``init_seed + i``).
    init_seed: int
    #: The data's dtype ("float32" or "float64").
    dtype: str
    #: ``repr`` of the Annealing the loss used, None without annealing.
    annealing: Optional[str]
    #: The optimiser's class name (``LBFGS``, ``ClippedAdam``, ...).
    optimizer: str
    #: Number of initialisations; the best final ELBO was kept.
    n_init: int
    #: Whether the convergence test was met, and how training ended.
    converged: bool
    stop_reason: str
    #: Final exact ELBO per data point of the kept run (closed form; Monte Carlo for non-Gaussian guides).
    elbo: float
    #: ELBO per data point with the generating dictionary held fixed (None if not computed).
    reference_elbo: Optional[float]
    #: ``elbo - reference_elbo``: >= 0 means the learned dictionary explains the data at least as well.
    elbo_minus_reference: Optional[float]
    #: Final exact ELBO of every restart.
    restart_elbos: List[float]
    #: Bars found: optimal matching, cosine > 0.95 (:func:`~pyro_esc.metrics.bars_recovery`).
    bars_found: int
    all_bars_found: bool
    #: Cosine of each true bar with its matched field, rounded to 4 digits.
    cosines: List[float]
    wall_time_s: float
    noise_var: float
    #: Learned fields, shape (D, H), columns in the order of the true bars they matched (not JSON).
    dictionary: torch.Tensor = field(repr=False, metadata=_NOT_METRICS)
    #: The training :class:`~pyro_esc.training.History` (not JSON).
    history: History = field(repr=False, metadata=_NOT_METRICS)
    #: The trained model and guide (not JSON; :func:`pyro_esc.save` keeps them).
    model: object = field(default=None, repr=False, metadata=_NOT_METRICS)
    guide_object: object = field(default=None, repr=False, metadata=_NOT_METRICS)
    #: Whether an amortised guide was trained warm-started from per-point posteriors
    #: (:func:`~pyro_esc.warm_start.fit_amortized`).
    warm_start: bool = False
    #: The encoder's hidden layer sizes for an amortised guide, else None.
    hidden: Optional[List[int]] = None
    #: ``repr`` of the model's prior (``Laplace()``, ``Gaussian()``, ...).
    prior: str = "Laplace()"

    def metrics(self):
        """The JSON-ready fields as a new dict (everything but ``dictionary``, ``history``, ``model``, ``guide_object``)."""
        return _metrics(self)


@dataclass(frozen=True, eq=False)
class PatchesResult:
    """What :func:`run_patches` returns: settings and metrics, the learned fields, history and snapshots.

    :meth:`metrics` returns the JSON-ready fields as a dict (the content of
    ``patches_metrics.json`` and of each patches entry of ``metrics.json``).
    """

    guide: str
    objective: str
    #: ``repr`` of the Annealing the loss used, None without annealing.
    annealing: Optional[str]
    n: int
    size: int
    n_latents: int
    #: Optimisation steps taken (also when the run was given in epochs).
    steps: int
    #: Epochs (passes over the data) those steps make.
    epochs: float
    batch_size: Optional[int]
    #: The initial learning rate of a gradient route; None on the EM route.
    lr: Optional[float]
    seed: int
    #: How fit trained (``History.route``: "lbfgs", "em", "rowwise", "svi" or "torch") and with which optimiser.
    route: str
    optimizer: str
    #: Final ELBO per data point (the objective's).
    elbo: float
    wall_time_s: float
    #: :func:`~pyro_esc.metrics.code_sparseness` of the posterior means: ``kurtosis`` and ``l1_l2``.
    sparseness: Dict[str, float]
    mean_field_spread_px: float
    median_field_spread_px: float
    #: Learned fields, shape (D, H), largest prior scale lambda first (not JSON).
    dictionary: torch.Tensor = field(repr=False, metadata=_NOT_METRICS)
    #: The training :class:`~pyro_esc.training.History` (not JSON).
    history: History = field(repr=False, metadata=_NOT_METRICS)
    #: Dictionary at each requested snapshot step, columns in the order of ``dictionary`` (not JSON).
    snapshots: Dict[int, torch.Tensor] = field(repr=False, metadata=_NOT_METRICS)
    #: The trained model and guide (not JSON; :func:`pyro_esc.save` keeps them).
    model: object = field(default=None, repr=False, metadata=_NOT_METRICS)
    guide_object: object = field(default=None, repr=False, metadata=_NOT_METRICS)

    def metrics(self):
        """The JSON-ready fields as a new dict (everything but ``dictionary``, ``history``, ``snapshots``)."""
        return _metrics(self)


# ---------------------------------------------------------------------- bars


#: Guides for which `run_bars` trains with L-BFGS on the exact objective by default; the others keep
#: the ClippedAdam recipe, which found better optima for them on bars (BENCHMARKS.md, "Bars over
#: sizes, noise levels and seeds").
LBFGS_GUIDES = ("local-full",)
#: Restarts `run_bars` uses with L-BFGS by default: one, since fit's float64 finish lets a run converge
#: (BENCHMARKS.md, "Bars over sizes, noise levels and seeds").
BARS_N_INIT = 1
#: The encoder `run_bars` gives amortised guides trained with ``warm_start``: one hidden layer of 300
#: units (and the skip connection), whose held-out amortisation gap is below 100 units' on 5x5 bars at
#: noise 0.1 (BENCHMARKS.md, "Amortised inference"; benchmarks/amortisation_gap.py). Without
#: ``warm_start`` amortised guides keep :class:`~pyro_esc.guides.AmortizedNormal`'s defaults.
BARS_WARM_START_HIDDEN = (300,)


def run_bars(guide="local-full", objective="entropy", n=1000, side=5, noise=0.3, steps=None, lr=0.2,
             batch_size=None, seed=0, device=None, out=None, progress=True, name=None, annealing=None,
             optimizer="auto", n_init=None, tol="auto", reference=True, init_seed=None, dtype=None,
             finish_in_float64=True, warm_start="auto", hidden=None, prior="laplace"):
    """Learn the bars test; return a :class:`BarsResult` and optionally draw the learned fields.

    Training, with ``optimizer="auto"``: for the guides in :data:`LBFGS_GUIDES` (per-point full
    covariances) and a closed-form objective on the full data, L-BFGS on the exact objective until
    convergence (in float64 from where float32 stalls), from :data:`BARS_N_INIT` initialisation(s)
    with the best final ELBO kept; otherwise the ClippedAdam recipe of :func:`bars_optimizer` (lr
    ``lr`` decaying to a fifth, ``steps`` steps), which finds better optima than L-BFGS for diagonal
    and amortised posteriors. BENCHMARKS.md ("Bars over sizes, noise levels and seeds") has the
    measurements behind both choices.

    :param optimizer: ``"auto"``, ``"lbfgs"`` or ``"svi"`` (the Adam recipe).
    :param int n_init: initialisations (default :data:`BARS_N_INIT` on the L-BFGS route, else 1).
    :param steps: the step limit (default: fit's, 20000 for L-BFGS; 2000 for the Adam recipe).
    :param int init_seed: seed of the initialisation (default ``seed``, which also draws the data).
    :param dtype: dtype of the data, and so of the model and guide (default torch's default). A
        float32 L-BFGS run that stalls on float32's resolution goes on in float64 and ends in float32.
    :param bool finish_in_float64: ``fit``'s option of that name (L-BFGS route); False stops where
        float32 stalls, as runs did before it existed.
    :param warm_start: amortised guides: train with :func:`~pyro_esc.warm_start.fit_amortized` (the
        dictionary from per-point full covariances by L-BFGS, ``n_init`` times; the encoder matched by
        least squares to the per-point optima solved at it; then the encoder alone by Adam on points
        drawn afresh from the model). ``steps`` is then each stage's step limit, ``steps`` and
        ``stop_reason`` describe the dictionary stage, and ``elbo`` is the returned encoder's.
        ``"auto"`` (default): for amortised guides with a closed-form objective on the full data and
        ``optimizer`` not ``"svi"``, where it finds every bar that training from scratch misses
        (BENCHMARKS.md, "Amortised inference"); False trains from the encoder's initialisation.
    :param hidden: amortised guides: the encoder's hidden layer sizes (default
        :data:`BARS_WARM_START_HIDDEN` with ``warm_start``, else ``AmortizedNormal``'s (100,)).
    :param bool reference: also fit the posteriors with the generating dictionary held fixed
        (:func:`~pyro_esc.evaluation.reference_elbo`) and report the learned ELBO minus that one.
    :param prior: the model's prior, ``"laplace"`` (default; the bars' amplitudes are Laplace),
        ``"gaussian"`` (probabilistic PCA, which finds the bars' subspace but not the bars) or any
        :class:`~pyro_esc.priors.Prior`.
    :returns: :class:`BarsResult`: the final exact ELBO per data point, the reference ELBO and the
        gap, the bars found (optimal matching, cosine > 0.95), the matched cosines, how training
        ended, wall time and settings; plus the learned ``dictionary`` (matched to the true bars)
        and the ``history``, which are not JSON.
    """
    _seed_everything(seed)
    x, true_dictionary = bars(n, side=side, noise=noise, seed=seed, dtype=dtype)
    model = SparseCoding(x.size(1), true_dictionary.size(1), prior=prior)
    if hidden is not None and not guide.startswith("amortized"):
        raise ValueError(f"hidden sets the encoder of amortised guides (amortized-*), got guide={guide!r}")
    deterministic = objective in ("entropy", "analytic") and batch_size is None
    if warm_start == "auto":
        warm_start = guide.startswith("amortized") and deterministic and optimizer != "svi"
    elif warm_start is not True and warm_start is not False:
        raise ValueError(f"warm_start must be 'auto', True or False, got {warm_start!r}")
    if hidden is None and warm_start:
        hidden = BARS_WARM_START_HIDDEN
    if warm_start and not guide.startswith("amortized"):
        raise ValueError(f"warm_start trains amortised guides (amortized-*), got guide={guide!r}")
    encoder_options = {} if hidden is None else dict(hidden=tuple(hidden))
    if warm_start:
        encoder_options["skip"] = True  # what fit_amortized's least-squares start wants
    guide_object = make_guide(guide, model, **encoder_options)
    loss = make_loss(objective)
    if optimizer not in ("auto", "lbfgs", "svi"):
        raise ValueError(f"optimizer must be 'auto', 'lbfgs' or 'svi', got {optimizer!r}")
    if warm_start and (optimizer == "svi" or not deterministic):
        raise ValueError("warm_start runs L-BFGS on a closed-form objective on the full data: it needs "
                         "objective 'entropy' or 'analytic', no batch_size, and optimizer 'auto' or 'lbfgs'")
    route_svi = not warm_start and (optimizer == "svi" or (optimizer == "auto" and not (
        deterministic and guide in LBFGS_GUIDES)))
    if n_init is None:
        n_init = 1 if route_svi else BARS_N_INIT
    if route_svi:
        steps = 2000 if steps is None else steps
        options = dict(optimizer="svi", optim=bars_optimizer(guide_object, steps, lr))
    else:
        options = dict(optimizer="lbfgs", tol=tol, finish_in_float64=finish_in_float64)
    start = time.perf_counter()
    if warm_start:
        stages = fit_amortized(model, guide_object, x, loss=loss, steps=steps, n_init=n_init,
                               seed=seed if init_seed is None else init_seed, device=device, progress=progress,
                               annealing=annealing, **options)
        history, final_elbo = stages.model_history, stages.final_elbo
    else:
        history = fit(model, guide_object, x, loss=loss, steps=steps, batch_size=batch_size,
                      seed=seed if init_seed is None else init_seed, device=device, progress=progress,
                      annealing=annealing, n_init=n_init, **options)
        final_elbo = history.final_elbo
    wall_time = time.perf_counter() - start
    dictionary = model.dictionary.detach().cpu()
    recovery = bars_recovery(dictionary, true_dictionary)
    reference_value = reference_elbo(x.to(dictionary.device if device is None else device), true_dictionary,
                                     seed=seed, prior=model.prior) if reference else None
    result = BarsResult(
        guide=guide, objective=objective, n=n, side=side, noise=noise, steps=history.step[-1],
        lr=lr if route_svi else None, batch_size=batch_size, seed=seed,
        init_seed=seed if init_seed is None else init_seed, dtype=str(x.dtype).replace("torch.", ""),
        annealing=_annealing_label(loss),
        optimizer=history.optimizer, n_init=n_init, converged=history.converged, stop_reason=history.stop_reason,
        elbo=final_elbo, reference_elbo=reference_value,
        elbo_minus_reference=None if reference_value is None else final_elbo - reference_value,
        restart_elbos=history.restart_elbos, bars_found=recovery.num_found, all_bars_found=recovery.all_found,
        cosines=[round(float(c), 4) for c in recovery.cosines], wall_time_s=round(wall_time, 2),
        noise_var=history.noise_var[-1],
        dictionary=dictionary[:, recovery.matching], history=history, model=model, guide_object=guide_object,
        warm_start=bool(warm_start),
        hidden=list(guide_object.hidden) if isinstance(guide_object, AmortizedNormal) else None,
        prior=repr(model.prior),
    )
    if out is not None:
        label = name or f"bars_fields_{guide}"
        figure = plots.plot_fields(result.dictionary, shape=(side, side),
                                   title=f"{GUIDE_LABELS.get(guide, guide)}: {recovery.num_found} of "
                                         f"{true_dictionary.size(1)} bars")
        plots.save_figure(figure, os.path.join(out, f"{label}.png"))
    return result


def bars_figures(out, results, x, side):
    """The bars figures: training samples, and the learned fields of every run side by side.

    :param results: :class:`BarsResult` of each run.
    """
    import matplotlib.pyplot as plt

    plots.save_figure(plots.plot_data_samples(x, shape=(side, side), n=24, title="Bars: training samples"),
                      os.path.join(out, "bars_samples.png"))
    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 2.6))
    for ax, result in zip(list(getattr(axes, "flat", [axes])), results):
        plots.plot_fields(result.dictionary, shape=(side, side), ncols=5, ax=ax,
                          title=f"{GUIDE_LABELS[result.guide]}\n{result.bars_found} of "
                                f"{len(result.cosines)} bars, ELBO {result.elbo:.3f}")
    figure.suptitle("Bars: learned generative fields (matched to the true bars)", y=1.1)
    plots.save_figure(figure, os.path.join(out, "bars_fields.png"))
    # A warm-started amortised run's history is its per-point dictionary stage (its encoder trains after).
    curves = {GUIDE_LABELS[r.guide] + (": per-point stage of fit_amortized" if r.warm_start else ""): r.history
              for r in results}
    plots.save_figure(plots.plot_training_curves(curves, x="wall_time", title="Bars: EntropyELBO per data point"),
                      os.path.join(out, "bars_curves.png"))


# -------------------------------------------------------------------- patches


#: The amortised encoder of the patches experiment: one hidden layer of 500 units, chosen on the full
#: experiment (H = 144) over AmortizedNormal's 100 units, low-rank heads, two layers and 1000 units
#: (BENCHMARKS.md, "Which encoder for the patches"; benchmarks/patch_encoders.py).
PATCH_ENCODER_HIDDEN = (500,)


def patch_data(n, size, seed, method="zca", epsilon=0.1, n_components=None):
    """Whitened natural image patches (DC removed per patch) and the fitted whitening.

    The default, ZCA with epsilon = 0.1 (of the mean eigenvalue), damps the
    highest, noise-dominated frequencies instead of amplifying them to unit
    variance; with it the learned fields are clean, localised edges (full
    ZCA, epsilon ~ 0, gives visibly noisier fields).
    """
    patches = image_patches(n, size=size, seed=seed)
    whitening = Whitening(method, n_components=n_components, epsilon=epsilon)
    return whitening.fit_transform(patches).float(), whitening


def run_patches(x, whitening, size, guide="amortized-diag", objective="entropy", n_latents=100, steps=2000,
                epochs=None, batch_size=None, lr=None, lr_schedule="auto", annealing=None, seed=0, device=None,
                progress=True, snapshots=(), hidden=PATCH_ENCODER_HIDDEN, optimizer="auto", inner_steps=None):
    """Learn sparse codes of whitened patches; return a :class:`PatchesResult` (metrics, fields, snapshots).

    Per-point guides on minibatches take fit's EM route (no learning rate). On the gradient
    routes the learning rate follows a cosine schedule down to a tenth by default: at a
    constant rate full-batch Adam makes the ELBO oscillate by several nats late in training,
    which makes end-of-run comparisons fragile.

    :param annealing: None, "default" (:meth:`Annealing.default` over the first half of the run,
        the true objective after), "authors" (:meth:`Annealing.authors`: beta_p 10 -> 1 over the
        first five epochs) or an Annealing.
    :param optimizer: fit's route: "auto" (EM for per-point guides on minibatches, unless ``lr`` is
        given, which selects the row-wise route), "em", an :class:`~pyro_esc.em.EM`, "rowwise", "svi".
    :param float lr: initial learning rate of a gradient route (None: fit's default for the route).
    :param lr_schedule: a gradient route's schedule; "auto": cosine, or none on the EM route.
    :param int inner_steps: row-wise route: updates of the batch's posteriors per step (None: fit's default).
    :param snapshots: steps at which to keep a copy of the dictionary.
    :param hidden: amortised guides: the encoder's hidden layers (default :data:`PATCH_ENCODER_HIDDEN`).
    """
    _seed_everything(seed)
    model = SparseCoding(x.size(1), n_latents)
    guide_object = make_guide(guide, model, hidden=hidden)
    kept = {}

    def keep(step, history):
        if step in snapshots:
            kept[step] = model.dictionary.detach().cpu().clone()

    start = time.perf_counter()
    loss = make_loss(objective)
    if lr_schedule == "auto":
        em = optimizer == "em" or isinstance(optimizer, EM) or optimizer == "auto" and auto_route(
            loss, guide_object, batch_size is None or batch_size >= x.size(0),
            lr is not None or inner_steps is not None) == "em"
        lr_schedule = None if em else "cosine"
    history = fit(model, guide_object, x, loss=loss, annealing=annealing,
                  steps=None if epochs else steps,
                  epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, seed=seed, device=device,
                  progress=progress, callback=keep, optimizer=optimizer, inner_steps=inner_steps)
    wall_time = time.perf_counter() - start
    with torch.no_grad():
        codes = gaussian_posterior(guide_object, x.to(model.dictionary.device)).mean.cpu()
    dictionary = model.dictionary.detach().cpu()
    order = torch.argsort(model.prior_scale.detach().cpu(), descending=True)
    spreads = field_spread(whitening.fields_to_pixels(dictionary.double()), (size, size))
    return PatchesResult(
        guide=guide, objective=objective, annealing=_annealing_label(loss),
        n=x.size(0), size=size, n_latents=n_latents, steps=history.step[-1], epochs=history.epoch[-1],
        batch_size=batch_size, lr=None if history.route == "em" else history.lr[0], seed=seed, route=history.route,
        optimizer=history.optimizer,
        elbo=history.final_elbo, wall_time_s=round(wall_time, 2),
        sparseness=code_sparseness(codes),
        mean_field_spread_px=float(spreads.mean()), median_field_spread_px=float(spreads.median()),
        dictionary=dictionary[:, order], history=history,
        snapshots={step: value[:, order] for step, value in kept.items()}, model=model, guide_object=guide_object,
    )


#: The epochs at which ``pyro-esc patches --epochs E`` keeps the fields (as the paper's figure of fields
#: over training), with the last epoch.
SNAPSHOT_EPOCHS = (1, 2, 5, 10)


def _steps_per_epoch(num_data, batch_size):
    # As fit counts them: one step per epoch on the full data, else ceil(N / batch).
    return 1 if batch_size is None or batch_size >= num_data else math.ceil(num_data / batch_size)


def epoch_snapshots(epochs, num_data, batch_size):
    """The steps that end the epochs of :data:`SNAPSHOT_EPOCHS` (and the last) in a run of ``epochs`` epochs.

    Empty without ``epochs``; on the full data a step is an epoch.
    """
    if epochs is None:
        return ()
    per_epoch = _steps_per_epoch(num_data, batch_size)
    return tuple(sorted({epoch * per_epoch for epoch in SNAPSHOT_EPOCHS + (epochs,) if epoch <= epochs}))


def patches_run_figures(out, results, whitening, size, num_data, batch_size):
    """The figures of ``pyro-esc patches``: the fields, the optimisation curves and the fields over training.

    :param dict results: :class:`PatchesResult` by label (e.g. the annealing setting); several are drawn
        side by side (``patches_fields_<label>.png`` each; one ``patches_curves.png``; one row per run in
        ``patches_fields_over_training.png``, which is drawn when the runs kept snapshots).
    """
    per_epoch = _steps_per_epoch(num_data, batch_size)
    single = len(results) == 1
    for label, result in results.items():
        title = (f"{result.n_latents} generative fields of {size}x{size} whitened patches "
                 f"(N = {result.n:,}{'' if single else f', annealing {label}'}; median spread "
                 f"{result.median_field_spread_px:.2f} px)")
        plots.save_figure(plots.plot_fields(result.dictionary, shape=(size, size), whitening=whitening, title=title),
                          os.path.join(out, "patches_fields.png" if single else f"patches_fields_{label}.png"))
    if per_epoch > 1:
        # On minibatches the per-step values are estimates (a running table, a chunk): draw the exact full-data
        # ELBO that fit records once an epoch.
        curves = {f"annealing {label}": _exact_curve(result.history, per_epoch) for label, result in results.items()}
        title = "Natural patches: exact ELBO per data point, once an epoch"
    else:
        curves = {f"annealing {label}": result.history for label, result in results.items()}
        title = "Natural patches: ELBO per data point"
    plots.save_figure(plots.plot_training_curves(curves, x="epoch" if per_epoch > 1 else "step", title=title),
                      os.path.join(out, "patches_curves.png"))
    rows = [(label, result) for label, result in results.items() if result.snapshots]
    if not rows:
        return

    def panel_title(label, step, fields):
        spread = float(field_spread(whitening.fields_to_pixels(fields.double()), (size, size)).median())
        return f"{label}, epoch {step / per_epoch:g}\nmedian spread {spread:.2f} px"

    figure = _fields_over_training(rows, whitening, size, panel_title, panel_size=(3.6, 3.8))
    figure.suptitle(f"Generative fields during training, by annealing ({size}x{size}, N = {rows[0][1].n:,}; the 25 "
                    f"largest lambda of each snapshot)")
    plots.save_figure(figure, os.path.join(out, "patches_fields_over_training.png"))


def _fields_over_training(rows, whitening, size, panel_title, panel_size):
    """One row of snapshot panels (the 25 largest-lambda fields each) per ``(label, result)`` in ``rows``.

    :param panel_title: ``(label, step, fields) -> str``.
    :param panel_size: (width, height) of a panel in inches.
    """
    import matplotlib.pyplot as plt

    columns = max(len(result.snapshots) for _, result in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(panel_size[0] * columns, panel_size[1] * len(rows)),
                                squeeze=False)
    for row, (label, result) in enumerate(rows):
        for column, (step, fields) in enumerate(sorted(result.snapshots.items())):
            plots.plot_fields(fields[:, :25], shape=(size, size), whitening=whitening, ncols=5, caption=False,
                              ax=axes[row, column], title=panel_title(label, step, fields))
        for column in range(len(result.snapshots), columns):
            axes[row, column].axis("off")
    return figure


def _exact_curve(history, per_epoch):
    # A history-like mapping of the exact evaluations, for plots.plot_training_curves.
    times = [max((t for s, t in zip(history.step, history.wall_time) if s <= step), default=0.0)
             for step in history.eval_step]
    return {"step": list(history.eval_step), "elbo": list(history.eval_elbo),
            "epoch": [step / per_epoch for step in history.eval_step], "wall_time": times}


def patch_figures(out, runs, whitening, size, x_raw=None):
    """Fields, optimisation curves and fields over training for the patch runs.

    :param runs: :class:`PatchesResult` by label; must include ``"non-amortized, annealed"``.
    """
    main = runs["non-amortized, annealed"]
    plots.save_figure(plots.plot_fields(main.dictionary, shape=(size, size), whitening=whitening,
                                        title=f"Natural image patches ({size}x{size}, whitened): {main.n_latents} "
                                              f"generative fields (diagonal posteriors, annealed; largest lambda first)"),
                      os.path.join(out, "patches_fields.png"))
    curves = {label: run.history for label, run in runs.items()}
    plots.save_figure(plots.plot_training_curves(curves, x="wall_time",
                                                 title="Natural patches: entropy-ELBO per data point"),
                      os.path.join(out, "patches_curves.png"))
    pairs = [(label, run) for label, run in runs.items() if run.snapshots]
    figure = _fields_over_training(pairs, whitening, size, lambda label, step, fields: f"{label}\nstep {step}",
                                   panel_size=(3.2, 3.4))
    figure.suptitle("Generative fields during training (full-batch steps = epochs), without and with annealing "
                    "(25 largest lambda)")
    figure.text(0.5, 0.0, f"{size}x{size} in pixel space (inverse whitening); each field scaled to its max |w|; "
                          "mid-grey = 0", ha="center", fontsize="small")
    plots.save_figure(figure, os.path.join(out, "patches_fields_over_training.png"))
    if x_raw is not None:
        plots.save_figure(plots.plot_data_samples(x_raw, shape=(size, size), n=24,
                                                  title="Natural image patches (whitened): samples"),
                          os.path.join(out, "patches_samples.png"))


# ------------------------------------------------------------------ reproduce


def _settings(quick):
    if fast_mode():
        return dict(bars_n=120, bars_steps=30, patch_n=300, patch_size=6, patch_latents=12, patch_epochs=2,
                    patch_batch=100, local_steps=10)
    if quick:
        return dict(bars_n=1000, bars_steps=2000, patch_n=5000, patch_size=12, patch_latents=100, patch_epochs=100,
                    patch_batch=500, local_steps=2500)
    return dict(bars_n=1000, bars_steps=2000, patch_n=20000, patch_size=12, patch_latents=144, patch_epochs=100,
                patch_batch=500, local_steps=3000)


def reproduce(out="figures", quick=False, seed=0, device=None, progress=True):
    """Run every experiment, write the figures and ``metrics.json`` into ``out``; return the metrics."""
    settings = _settings(quick)
    os.makedirs(out, exist_ok=True)
    metrics = {"quick": bool(quick), "fast_mode": fast_mode(), "seed": seed, "settings": settings}
    started = time.perf_counter()

    bars_runs = [run_bars(guide, n=settings["bars_n"], steps=settings["bars_steps"], seed=seed, device=device,
                          progress=progress) for guide in ("local-diag", "local-full", "amortized-full")]
    x_bars, _ = bars(settings["bars_n"], seed=seed)
    bars_figures(out, bars_runs, x_bars, 5)
    metrics["bars"] = [r.metrics() for r in bars_runs]

    size = settings["patch_size"]
    x, whitening = patch_data(settings["patch_n"], size, seed)
    epochs, batch, local_steps = settings["patch_epochs"], settings["patch_batch"], settings["local_steps"]
    # Snapshots of the full-batch runs (one step = one epoch), early to late.
    snapshots = {max(1, round(f * local_steps)) for f in (0.05, 0.2, 0.5, 1.0)}
    common = dict(n_latents=settings["patch_latents"], seed=seed, device=device, progress=progress)
    runs = {
        "non-amortized": run_patches(x, whitening, size, guide="local-diag", steps=local_steps, lr=0.05,
                                     snapshots=snapshots, **common),
        "non-amortized, annealed": run_patches(x, whitening, size, guide="local-diag", steps=local_steps, lr=0.05,
                                               annealing="default", snapshots=snapshots, **common),
        "amortized": run_patches(x, whitening, size, guide="amortized-diag", epochs=epochs, batch_size=batch,
                                 lr=0.01, **common),
        "amortized, annealed": run_patches(x, whitening, size, guide="amortized-diag", epochs=epochs,
                                           batch_size=batch, lr=0.01, annealing="default", **common),
    }
    patch_figures(out, runs, whitening, size, x_raw=x)
    metrics["patches"] = {label: run.metrics() for label, run in runs.items()}
    metrics["wall_time_s"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(out, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics
