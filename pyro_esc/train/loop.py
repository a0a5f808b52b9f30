"""The training loop: :func:`fit` trains a model and guide and records what happened.

One function owns the loop so that every experiment, notebook and the command
line train the same way: L-BFGS to convergence on the exact objective or SVI
steps on minibatches, restarts, learning-rate schedules, a seed, the device, a
progress bar, a :class:`~pyro_esc.History`, checkpoints that resume bit-for-bit
on CPU (:mod:`pyro_esc.checkpoint`), and a clear stop when anything turns
non-finite.

``fit`` is three parts: :func:`~pyro_esc.train.options.check_fit_options` validates every argument once,
before training (:mod:`pyro_esc.train.options`); :func:`training_step` is one step (the route's update from
:mod:`pyro_esc.steppers`, then, for :class:`~pyro_esc.EntropyELBO`, the
explicit ``update`` that writes lambda*, sigma^2* into the model);
:class:`~pyro_esc.History` records, and :mod:`pyro_esc.convergence` decides
when to stop.
"""

import math
import time
import warnings
from dataclasses import replace

import torch
# The text bar, also in notebooks: it is saved with an executed notebook as its final line and renders on
# GitHub, where tqdm.auto's widget would be saved at 0%.
from tqdm.std import tqdm

import pyro
from pyro import poutine
from pyro.infer import Trace_ELBO

from ..infer.objectives import (AnalyticELBO, EntropyELBO, NonFiniteObjectiveError, analytic_elbo_per_point,
                                entropy_elbo_per_point)
from ._isolation import check_owns_its_parameters, tie_to_data
from .checkpoint import (  # noqa: F401 - CHECKPOINT_FORMAT and load_checkpoint: public here too
    CHECKPOINT_FORMAT,
    data_fingerprint,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from .convergence import Convergence, ConvergenceWarning  # noqa: F401 - ConvergenceWarning: public here too
from .history import EXACT, MONTE_CARLO, History
# fit's options and recipes, public here too (pyro_esc.training.decaying_adam, ...).
from .options import (  # noqa: F401
    DEFAULT_GTOL,
    DEFAULT_LR,
    DEFAULT_MAX_STEPS,
    DEFAULT_TOL,
    DEFAULT_WINDOW,
    FINISH_DTYPE,
    OPTIMIZERS,
    ROWWISE_INNER_STEPS,
    ROWWISE_LR,
    TRAINING_DTYPES,
    FitOptions,
    auto_route,
    check_fit_options,
    _check_lr_factor,
    _prepare_data,
)
from .recipes import AMORTIZED_LR, bars_optimizer, decaying_adam  # noqa: F401
from .restarts import reinitialize, restore, snapshot
from .standard_units import data_unit, in_standard_units, trains_in_standard_units

#: sigma^2* below this fraction of the data's mean variance means the model fits the data exactly
#: (e.g. constant data, or data of rank <= H): the ELBO then grows without bound. (At 1e-10 a run on
#: 300 digits with H = 64 reported convergence at sigma^2* = 1.3e-10 of the variance.)
NOISE_COLLAPSE = 1e-8

#: sigma^2 above (1 - this) times the data's variance after training means the codes explain nothing.
NOTHING_EXPLAINED = 1e-3


#: fit's arguments that are not training options: check_fit_options gets every other one.
_NOT_OPTIONS = ("model", "guide", "data", "device", "dtype", "progress", "callback")


def fit(model, guide, data, loss=None, *, optimizer="auto", steps=None, epochs=None, batch_size=None, lr=None,
        lr_schedule=None, optim=None, tol="auto", gtol="auto", window=DEFAULT_WINDOW, n_init=1, seed=0,
        device=None, dtype=None, progress=True, record_every=1, eval_every=None, trace_elbo_every=None,
        trace_elbo_particles=16, checkpoint=None, checkpoint_every=None, resume=None, callback=None,
        annealing=None, train_dictionary=True, inner_steps=None, train_model=True, finish_in_float64=True):
    """Train ``model`` and ``guide`` on ``data``; return a :class:`~pyro_esc.History`.

    **Four routes**, chosen by ``optimizer`` (``History.route`` says which ran):

    - ``"lbfgs"``: torch's L-BFGS with a strong-Wolfe line search on the exact,
      full-batch objective, one L-BFGS iteration per step, until the convergence
      test holds (``tol``, ``gtol``, ``window``) or ``steps`` run out. Any
      ``torch.optim`` optimiser class, or a factory ``params -> optimiser`` such
      as ``functools.partial(torch.optim.Adam, lr=0.01)``, takes the same route
      (:class:`~pyro_esc.steppers.TorchStep`): it optimises the parameters that
      the objective reads, found through Pyro's param store as SVI finds them.
    - ``"svi"``: one ``SVI.step`` per step with ``optim`` (a ``pyro.optim``
      optimiser, default Adam(``lr``)): for minibatches (``batch_size``) and
      sampled objectives such as ``Trace_ELBO``. Minibatches are indices passed
      to model and guide as ``subsample=...`` (Pyro's idiom), a fresh random
      permutation per epoch.
    - ``"rowwise"``: minibatch steps that cost O(batch) for a closed-form
      objective and a per-point guide (:class:`~pyro_esc.rowwise.RowwiseStep`):
      only the batch's rows of the guide's per-point parameters are read and
      updated, by Adam with its state kept per row (a point's posterior moves
      only when its point is in the batch), the global parameters by Adam
      (``lr``, ``lr_schedule``); ``inner_steps`` > 1 updates the batch's rows
      that many times per step, all but the last with the dictionary fixed.
    - ``"em"`` (or :class:`~pyro_esc.em.EM` for its options): variational EM for a
      closed-form objective and a per-point Gaussian guide (``AutoNormal``,
      :class:`~pyro_esc.LocalMultivariateNormal`), on the full data or on
      minibatches (:mod:`pyro_esc.em`): each step solves its batch's posteriors
      exactly (:func:`~pyro_esc.solver.solve_posteriors`); after every
      ``EM(chunk=...)`` points the dictionary is set in closed form from their
      sufficient statistics, with a heavy-ball extrapolation (``momentum``), and
      lambda*, sigma^2* with it. The last step solves every point's posterior at
      the final model. No learning rate.
    - ``"auto"`` (default): ``"lbfgs"`` for a closed-form objective on the full
      data, unless an SVI setting (``optim``, ``lr`` or ``lr_schedule``) is
      given; ``"em"`` for a closed-form objective on minibatches with
      ``AutoNormal`` or ``LocalMultivariateNormal`` unless such a setting is given;
      ``"rowwise"`` for a closed-form objective on minibatches with another guide
      that offers row access (or with ``lr``/``lr_schedule``) unless ``optim``
      is given; else ``"svi"`` (:func:`auto_route`).

    With :class:`~pyro_esc.EntropyELBO` (the default loss) each step is
    followed by ``loss.commit(...)``, which writes lambda*, sigma^2* of the
    parameters after the step into the model. On minibatches the run keeps the
    running statistics of every point (``loss.init_statistics``): state that the
    loop owns, passes to every step and checkpoints, and that each commit brings
    up to date with the batch's rows (on the row-wise route as the step evaluated
    them, before its update).

    **Units**: on the gradient routes (torch, SVI, row-wise) with a per-point Gaussian guide (``AutoNormal``,
    :class:`~pyro_esc.LocalMultivariateNormal`) or an :class:`~pyro_esc.AmortizedNormal`, and a
    :class:`~pyro_esc.SparseCoding`, data far from the scale the routes' defaults were measured at are divided by a power of two that brings them within a
    factor sqrt(2) of it, with the model and guide rescaled into those units and back (exactly: the model
    is scale-equivariant); so data times 2^k give the very same run and data in other units the same
    result where the problem has a clear optimum (:mod:`pyro_esc.standard_units`; ``History.unit``).
    The EM route is unit-free by construction.

    **Convergence**: with ``tol`` the run stops once the exact objective per
    data point changed by at most ``tol`` (relative) over the last ``window``
    steps and, with ``gtol``, the gradient norm of the per-point loss is at most
    ``gtol`` (:class:`~pyro_esc.convergence.Convergence`). On the torch route a
    run also stops when it stalls: a step that finds no decrease at all resets
    the optimiser's memory, and a second one in a row ends the run
    (``History.converged`` is then False, and ``stop_reason`` says "stalled").
    ``History.converged`` and ``History.stop_reason`` say how the run ended; a
    run that reaches its step limit unconverged, or stalls, also issues a
    :class:`ConvergenceWarning`, as does a model that ends up explaining none of
    the data's variance.

    **Restarts**: ``n_init=k`` trains from k initialisations (seeds ``seed``,
    ``seed + 1``, ...; see :mod:`pyro_esc.restarts` for what differs) and keeps
    the one with the best exact final ELBO; ``History.restart_elbos`` holds all k.

    What is recorded (see :class:`~pyro_esc.History`): the objective at every
    ``record_every``-th step (``History.elbo``, ``History.elbo_kind`` saying
    whether it is exact or an estimate), and the exact full-data ELBO every
    ``eval_every`` steps and after the last (``History.final_elbo`` is the
    number to report).

    Example::

        >>> import pyro
        >>> from pyro_esc import SparseCoding, LocalMultivariateNormal, fit
        >>> from pyro_esc.data import bars
        >>> from pyro_esc.metrics import bars_recovery
        >>> pyro.clear_param_store()
        >>> x, true_dictionary = bars(500, seed=0)              # 5x5 bars, noise 0.3
        >>> model = SparseCoding(25, 10)
        >>> history = fit(model, LocalMultivariateNormal(model), x, progress=False)
        >>> history.route, history.converged, bars_recovery(model.dictionary, true_dictionary).num_found
        ('lbfgs', True, 10)

    :param model: a :class:`~pyro_esc.SparseCoding` (or any Pyro model taking ``(x, subsample=None)``).
    :param guide: a guide for it.
    :param data: the data, (N, D): a tensor (keeps its dtype) or an array (converted to ``dtype``).
        Constant data (every point the same) is rejected: its ELBO is unbounded.
    :param loss: a ``pyro.infer.ELBO``; default ``EntropyELBO()``.
    :param optimizer: ``"auto"``, ``"lbfgs"``, ``"svi"``, ``"rowwise"``, ``"em"``, an
        :class:`~pyro_esc.em.EM`, or a torch optimiser class or factory.
    :param int steps: the step limit (default: 20000 on the torch route and full-batch EM, which stop on
        convergence; 1000 on the others).
    :param int epochs: alternatively, passes over the data (ceil(N / batch_size) steps each).
    :param int batch_size: minibatch size; None for full batch.
    :param float lr: Adam's learning rate on the SVI route (default 0.05) and the row-wise route
        (default 0.4, rows and dictionary alike).
    :param lr_schedule: SVI and row-wise routes: None/'constant', 'cosine' (to 0.1 lr), 'exponential'
        (to 0.1 lr) or a callable f(progress in [0, 1]) -> factor on ``lr``.
    :param optim: SVI route: a ``pyro.optim.PyroOptim`` to use instead of Adam(lr) (then ``lr``
        only feeds the schedule, if any).
    :param float tol: relative change of the objective over ``window`` steps that counts as
        converged; ``"auto"``: 1e-7 on the torch route and full-batch EM, None (run every step) on the
        SVI and row-wise routes and minibatch EM.
    :param float gtol: bound on the per-point gradient norm for convergence (torch route); None
        for no gradient test.
    :param int window: steps over which the change is measured.
    :param int n_init: number of initialisations; the best exact ELBO is kept.
    :param int seed: seeds Pyro's RNG and the minibatch order (restart i uses ``seed + i``); an integer >= 0.
    :param device: move data, model and guide there (default: the data's device); an unavailable CUDA
        device or ``"meta"`` is refused before training.
    :param dtype: dtype for array data (default torch's default dtype): float32 or float64. float16 and
        bfloat16 (as data or as ``dtype``) are refused: the objective's sums need float32's resolution.
    :param bool progress: show a tqdm progress bar with the objective, lambda and sigma^2: steps and
        their rate, and the time left only where the run has a fixed number of steps (with a
        convergence test the step limit is a bound, not an estimate); a float64 continuation
        goes on counting under "fit, in float64".
    :param int record_every: record the history every this many steps (and at the last).
    :param int eval_every: record the exact full-data ELBO every this many steps (and after the
        last); default: once per epoch for minibatches, after the last step for full batch.
    :param int trace_elbo_every: every this many recorded steps also record a Monte Carlo estimate
        of the ELBO per data point with Pyro's ``Trace_ELBO`` (vectorised particles) on the full data.
    :param int trace_elbo_particles: particles for that estimate.
    :param str checkpoint: path to save a checkpoint to, every ``checkpoint_every`` steps and at the end
        (where the run trains in standard units, see **Units**, the model and guide in it are in those units;
        ``resume`` returns them in the data's own).
    :param int checkpoint_every: see ``checkpoint``.
    :param str resume: path of a checkpoint to continue from; ``steps``/``epochs`` are the total.
    :param callback: optional ``callback(step, history)``, called after each recorded step.
    :param annealing: entropy annealing for an :class:`~pyro_esc.EntropyELBO` loss: an
        :class:`~pyro_esc.annealing.Annealing`, or ``"default"`` for
        :meth:`~pyro_esc.annealing.Annealing.default` over the first half of the steps (the true
        objective after), or ``"authors"`` for :meth:`~pyro_esc.annealing.Annealing.authors` (beta_p
        10 -> 1 stepwise over the first five epochs). Equivalent to ``loss=EntropyELBO(annealing=...)``; fit sets the weights
        before every step (``EntropyELBO.set_annealing_step``) and records them in ``History.betas``.
        A schedule longer than the run is refused (the run would end on the annealed objective). When the
        convergence test holds (or the line search stalls in float64) before the schedule has ended, the
        optimiser is at rest on the annealed objective: the schedule is cut there and the run goes on with
        the true objective until its own test holds (``History.annealing_cut``).
    :param bool train_dictionary: False keeps the dictionary fixed and fits only the guide (torch or
        row-wise route), as :func:`~pyro_esc.evaluation.reference_elbo` does.
    :param bool train_model: False keeps every model parameter fixed (dictionary, and lambda, sigma^2
        for AnalyticELBO, which would otherwise learn them) and fits only the guide, as
        :func:`~pyro_esc.encode` does for new data.
    :param int inner_steps: row-wise route: updates of the batch's posterior rows per step (default
        :data:`ROWWISE_INNER_STEPS`; BENCHMARKS.md, "The row-wise route").
    :param bool finish_in_float64: torch route, data in a lower precision than float64 (float32): when
        the line search stalls (no lower value twice in a row: the steps have reached the objective's
        resolution, not the optimum), continue the run in float64 until the convergence test holds
        or the steps run out, then return the model and guide in their own dtype
        (``History.finish_step`` says where float64 took over). Needs model and guide to be
        ``torch.nn.Module`` s (to convert them) and no ``checkpoint``; otherwise the run stops there,
        as with False.
    :raises NonFiniteObjectiveError: if the objective or a parameter becomes NaN or inf, or the
        noise variance collapses; the message says at which step and which term.
    """
    # The options exactly as given (this signature is the one place their names and defaults are written).
    arguments = {name: value for name, value in locals().items() if name not in _NOT_OPTIONS}
    check_owns_its_parameters(model, guide)
    x = _prepare_data(data, device, dtype)
    options = check_fit_options(model, guide, x, **arguments)
    # From here on a per-point guide's posteriors are those of x (evaluations on other data are refused).
    tie_to_data(guide, x)
    for module in (model, guide):
        if isinstance(module, torch.nn.Module):
            module.to(x.device)
    unit = data_unit(x) if trains_in_standard_units(options.route, model, guide) else 1.0
    if unit != 1.0:
        # A gradient route's path depends on the data's units: it runs on the data brought by a power of two
        # into the range its defaults were measured in (the model is scale-equivariant and the guide rescales
        # exactly); see pyro_esc.standard_units.
        standard = replace(options, unit=unit, data_variance=options.data_variance / unit ** 2)
        with in_standard_units(model, guide, unit):
            history = _fit_restarts(model, guide, x / unit, standard, int(seed), progress, callback, resume)
    else:
        history = _fit_restarts(model, guide, x, options, int(seed), progress, callback, resume)
    _warn_if_nothing_explained(model, options)
    return history


def _fit_restarts(model, guide, x, options, seed, progress, callback, resume):
    """``options.n_init`` runs from seeds ``seed``, ``seed + 1``, ...; the best final ELBO is kept."""
    if options.n_init == 1:
        return _fit_run(model, guide, x, options, seed, progress, callback, resume)[0]
    best, best_state, elbos, names = None, None, [], None
    for restart in range(options.n_init):
        if restart > 0:
            reinitialize(model, guide, names, seed + restart)
        history, stepper = _fit_run(model, guide, x, options, seed + restart, progress, callback, None)
        names = stepper.names
        elbos.append(history.final_elbo)
        if best is None or history.final_elbo > best.final_elbo:
            best, best_state = history, snapshot(names, model, guide)
            best.best_restart = restart
    restore(best_state, model, guide)
    best.restart_elbos = elbos
    return best


def _warn_if_nothing_explained(model, options):
    # sigma^2 at the data's variance: the codes explain no more than the data's mean would. The run may well
    # have converged, to the all-zero code: with the posteriors at a scale far from the data's (data in other
    # units than the guide's initial scale assumes, with a guide fit cannot rescale, pyro_esc.standard_units),
    # that point attracts the gradient routes; or the run was too short to leave it.
    noise_var = getattr(model, "noise_var", None)
    if "raw_dictionary" in options.frozen or not isinstance(noise_var, torch.Tensor) or noise_var.numel() != 1:
        return
    if float(noise_var.detach()) >= (1 - NOTHING_EXPLAINED) * options.data_variance:
        warnings.warn(f"fit: the model explains none of the data's variance (sigma^2 = "
                      f"{float(noise_var.detach()):.3g}, the data's variance per dimension "
                      f"{options.data_variance:.3g}): the codes are all near 0. If the run was short, give it "
                      f"more steps. If the data are in unusual units and the guide is one fit does not rescale "
                      f"(its own are AutoNormal, LocalMultivariateNormal, AmortizedNormal and Pyro's joint "
                      f"Gaussian autoguides), standardise the data (divide by their standard deviation) or pass "
                      f"the guide an init_scale of their scale", ConvergenceWarning, stacklevel=3)


def _fit_run(model, guide, x, options, seed, progress, callback, resume):
    """One run: :func:`_fit_once`, continued in float64 where a lower precision stalled it.

    The torch route stalls when its line search finds no lower value twice in a row, which in
    float32 happens once steps change the objective by less than its resolution (about 1e-7
    relative), often long before the convergence test holds: the slow directions of the bars
    problems are still being followed there. With ``options.finish_in_float64`` the model, guide
    and data are then converted to float64, the run continues from the same parameters (its step
    count, annealing schedule and History go on; the curvature memory starts afresh) until the
    convergence test holds or the steps run out, and the model and guide are converted back, so
    the caller's dtype is unchanged. ``History.finish_step`` records where float64 took over, and
    the final ELBO is evaluated again at the returned parameters.
    """
    history, stepper = _fit_once(model, guide, x, options, seed, progress, callback, resume)
    if not (options.finish_in_float64 and history.stop_reason.startswith("stalled")
            and history.step and history.step[-1] < options.total_steps):
        _warn_if_stalled(history)
        return history, stepper
    dtype, stalled_at = x.dtype, history.step[-1]
    model.to(FINISH_DTYPE)
    guide.to(FINISH_DTYPE)
    try:
        history, stepper = _fit_once(model, guide, x.to(FINISH_DTYPE), options, seed, progress, callback, None,
                                     continue_from=history)
    finally:
        model.to(dtype)
        guide.to(dtype)
    history.finish_step = stalled_at
    history.stop_reason += f" (in float64 from step {stalled_at}, where {_dtype_name(dtype)} stalled)"
    # The parameters returned are the float64 ones rounded to the caller's dtype: report their ELBO, and
    # write the scales of exactly these parameters.
    elbo, history.eval_kind = _exact_elbo(model, guide, x, options.loss)
    history.eval_elbo[-1] = history.in_data_units(elbo)
    if isinstance(options.loss, EntropyELBO):
        options.loss.update(model, guide, x)
    _warn_if_stalled(history)
    return history, stepper


def _warn_if_stalled(history):
    # A stall ends the run where the line search finds no decrease: not an optimum the convergence test
    # confirmed. Say so where the user sees it, with the gradient left.
    if history.stop_reason.startswith("stalled"):
        gradient = history.grad_norm[-1] if history.grad_norm else math.nan
        warnings.warn(f"fit: the run stalled at step {history.step[-1]} with gradient norm {gradient:.2g}, before "
                      f"the convergence test held: the result is not a confirmed optimum. If the data are in "
                      f"unusual units, standardise them (divide by their standard deviation); with a per-point "
                      f"Gaussian guide, optimizer='em' solves the posteriors exactly", ConvergenceWarning,
                      stacklevel=5)  # _fit_run -> _fit_restarts -> fit -> the caller's line


def _fit_once(model, guide, x, options, seed, progress, callback, resume, continue_from=None):
    """One training run (see :func:`fit`); returns its History and the route's stepper.

    :param History continue_from: the History of a run to go on with (its last step, wall time and
        records), from the current parameters with a fresh optimiser; see :func:`_fit_run`.
    """
    loss, batches, total_steps = options.loss, options.batches, options.total_steps
    history = History(num_data=x.size(0), elbo_kind=options.elbo_kind, route=options.route_name, unit=options.unit,
                      data_dim=x.size(1))
    batches.reset(seed)
    start_step, elapsed, state = 0, 0.0, None
    # What identifies the data in a checkpoint: one pass over x, once per run.
    fingerprint = data_fingerprint(x) if options.checkpoint is not None or resume is not None else None
    if resume is not None:
        state = restore_checkpoint(resume, model, guide, loss, batches, x, options.route, fingerprint)
        start_step, elapsed, history = state["step"], state["wall_time"], History.from_dict(state["history"])
    elif continue_from is not None:
        start_step, elapsed, history = continue_from.step[-1], continue_from.wall_time[-1], continue_from
    else:
        pyro.set_rng_seed(seed)
    stepper = options.make_step(model, guide, x)
    if state is not None:
        stepper.load_state_dict(state["optim"])
    # The run's state besides parameters and optimiser: an EntropyELBO's running minibatch statistics (or None).
    # The loop owns it: builds it (or takes it from the checkpoint), passes it to every step, checkpoints it.
    statistics = state["statistics"] if state is not None else options.init_statistics(model, guide, x)
    history.optimizer = stepper.name
    convergence = None if options.tol is None else Convergence(options.tol, options.gtol, options.window)
    annealing = getattr(loss, "annealing", None) if isinstance(loss, EntropyELBO) else None

    def save(step):
        save_checkpoint(options.checkpoint, step, model, guide, stepper.state_dict(), loss, batches, history,
                        time.perf_counter() - started, x, options.route, fingerprint, statistics)

    bar = tqdm(**_bar_extent(options, start_step, continue_from), disable=not progress, dynamic_ncols=True)
    started = time.perf_counter() - elapsed
    step, previous, stalls, stalled = start_step, None, 0, None
    try:
        for step in range(start_step + 1, total_steps + 1):
            if options.manage_lr:
                stepper.set_lr(options.lr * _check_lr_factor(options.schedule, (step - 1) / max(1, total_steps - 1)))
            subsample = batches.next()
            kwargs = {} if subsample is None else {"subsample": subsample.to(x.device)}
            annealing_step = step - 1 if history.annealing_cut is None else max(step - 1, annealing.num_steps)
            value, grad_norm = training_step(stepper, model, guide, x, kwargs, step, options, annealing_step,
                                             statistics)
            done = convergence is not None and history.elbo_kind == EXACT and convergence.update(-value / x.size(0),
                                                                                                 grad_norm)
            if stepper.route == "torch" and value == previous:
                # No decrease at all: the line search found no lower value along the current direction.
                # Once, forget the curvature memory and try steepest descent; twice in a row, stop.
                stalls += 1
                stepper.reset()
                if stalls >= 2:
                    stalled = (f"stalled: the line search found no decrease in two successive steps, the second "
                               f"from steepest descent (gradient norm {grad_norm:.2g}; in {_dtype_name(x.dtype)} "
                               f"the objective is resolved to about {torch.finfo(x.dtype).eps:.0e} relative)")
                    done = True
            else:
                stalls = 0
            previous = value
            handed_to_float64 = stalled is not None and options.finish_in_float64 and x.dtype != FINISH_DTYPE
            if done and annealing is not None and annealing_step < annealing.num_steps and not handed_to_float64:
                # Converged (or stalled, in float64) on the annealed objective before the schedule ended: the rest
                # of the schedule would only move the weights under a resting optimiser. Cut it here and go on
                # with the true objective, so that the run ends where the convergence test holds for the ELBO.
                # (A float32 stall first goes on in float64 with the schedule, see _fit_run.)
                history.annealing_cut, done, stalls, stalled, previous = step, False, 0, None, None
                convergence = Convergence(options.tol, options.gtol, options.window)
                stepper.reset()
            last = done or step == total_steps
            if step % options.record_every == 0 or last:
                history.record(step, step / batches.steps_per_epoch, value, model, stepper.current_lr(),
                               getattr(loss, "betas", (1.0, 1.0, 1.0)), time.perf_counter() - started, grad_norm)
                if options.trace_elbo_every is not None and (step % options.trace_elbo_every == 0 or last):
                    history.trace_elbo_step.append(step)
                    history.trace_elbo.append(history.in_data_units(_trace_elbo(model, guide, x,
                                                                                options.trace_elbo_particles)))
                if progress:
                    bar.set_postfix(history.progress_postfix(), refresh=False)
            if last and hasattr(stepper, "finish"):
                if options.checkpoint is not None:
                    # What a continued run resumes from: the state before the final E-step below.
                    save(step)
                # The EM route's last E-step: every point's posterior at the final model.
                stepper.finish(x)
            if last or options.eval_due(step):
                elbo, history.eval_kind = _exact_elbo(model, guide, x, loss)
                history.eval_step.append(step)
                history.eval_elbo.append(history.in_data_units(elbo))
            if callback is not None and history.step and history.step[-1] == step:
                callback(step, history)
            bar.update(1)
            if done:
                break
            if options.checkpoint_every is not None and step % options.checkpoint_every == 0 and step != total_steps:
                _check_parameters_finite(step)
                save(step)
    finally:
        bar.close()
    _check_parameters_finite(step)
    history.evaluations += stepper.evaluations
    history.converged = convergence is not None and convergence.reason is not None
    if history.converged:
        history.stop_reason = convergence.reason
    elif stalled is not None:
        history.stop_reason = stalled
    else:
        history.stop_reason = f"step limit: {step} steps"
        if convergence is not None:
            history.stop_reason += f" without meeting tol={options.tol:g} (unconverged)"
            # _fit_once -> _fit_run -> _fit_restarts -> fit: the warning names the caller's line.
            warnings.warn(f"fit: {history.stop_reason}; pass more steps, or a larger tol", ConvergenceWarning,
                          stacklevel=5)
    if history.annealing_cut is not None and "annealing cut" not in history.stop_reason:
        history.stop_reason += (f" (annealing cut at step {history.annealing_cut}, where the run had come to rest on "
                                f"the annealed objective; the true objective from there)")
    if options.checkpoint is not None and not hasattr(stepper, "finish"):
        save(step)
    return history, stepper


def _bar_extent(options, start_step, continue_from):
    """tqdm's total, start and label for a run: no total (so no remaining time) where a convergence test
    ends the run, since the step limit is then only a bound (20,000 for L-BFGS, which converges in hundreds:
    an estimate against it reads hours); a float64 continuation goes on counting from where float32 stopped."""
    total = None if options.tol is not None else options.total_steps
    label = "fit, in float64" if continue_from is not None else "fit"
    return {"total": total, "initial": start_step, "desc": label}


def training_step(stepper, model, guide, x, kwargs, step, options, annealing_step=None, statistics=None):
    """One training step: the route's stepper steps, then commits (an EntropyELBO's explicit scale update).

    :param int annealing_step: the completed steps the annealing weights are read at (default ``step - 1``;
        past the schedule's end once :func:`fit` has cut it, ``History.annealing_cut``).
    :param statistics: the run's running minibatch statistics (:meth:`FitOptions.init_statistics`), or None:
        the step reads them, its commit stores the batch's rows in them.
    :returns: ``(value, grad_norm)``: the objective to record (a loss, -N ELBO) and the gradient
        norm of the per-point loss if the route knows it (else None). For EntropyELBO the value is
        the one after the step (exact on the full data; the running estimate on a minibatch); for
        other closed-form objectives on the torch route too; on the SVI route the value the step
        evaluated.
    :raises NonFiniteObjectiveError: naming the step and the term or site.
    """
    loss = options.loss
    if isinstance(loss, EntropyELBO):
        loss.set_annealing_step(step - 1 if annealing_step is None else annealing_step)
    try:
        # The stepper protocol: step, then commit the scales the step's parameters imply (each route its own way).
        value, grad_norm = stepper.step(x, kwargs, statistics)
        value, noise_var = stepper.commit(value, x, kwargs, statistics)
        if noise_var is not None and noise_var < NOISE_COLLAPSE * options.data_variance:
            raise NonFiniteObjectiveError(
                f"the noise variance sigma^2* collapsed to {noise_var:g} (data variance "
                f"{options.data_variance:g}): the model reproduces the data exactly (data of rank < H?), "
                f"and the ELBO grows without bound")
    except NonFiniteObjectiveError as error:
        raise NonFiniteObjectiveError(f"step {step}: {error}") from error
    except ValueError as error:
        # Pyro's distribution validation fails first when a parameter is NaN.
        if _non_finite_parameters():
            raise NonFiniteObjectiveError(
                f"step {step}: {type(loss).__name__} failed ({error.args[0].splitlines()[0]}); "
                f"{_diagnose_non_finite(model, guide, x, kwargs)}") from error
        raise
    if not math.isfinite(value) or (grad_norm is not None and not math.isfinite(grad_norm)):
        raise NonFiniteObjectiveError(
            f"step {step}: {type(loss).__name__} loss is {value} (gradient norm {grad_norm}); "
            f"{_diagnose_non_finite(model, guide, x, kwargs)}")
    return value, grad_norm


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _exact_elbo(model, guide, x, loss):
    """The full-data ELBO per data point and its kind, without changing anything.

    Closed-form objectives evaluate themselves; under a sampled objective a
    Gaussian guide is evaluated in closed form (AnalyticELBO at the model's
    scales), any other guide by the objective's own Monte Carlo estimate.
    """
    if isinstance(loss, EntropyELBO):
        return entropy_elbo_per_point(model, guide, x), EXACT
    try:
        return analytic_elbo_per_point(model, guide, x), EXACT
    except ValueError:
        if isinstance(loss, AnalyticELBO):
            raise
    with torch.no_grad(), poutine.block():
        return -loss.loss(model, guide, x) / x.size(0), MONTE_CARLO


def _trace_elbo(model, guide, x, particles):
    # Monte Carlo, so that a closed-form objective can be checked against Pyro's own estimator.
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad(), poutine.block():
        return -elbo.loss(model, guide, x) / x.size(0)


def _diagnose_non_finite(model, guide, x, kwargs):
    """Name the sites and parameters that are not finite (for the error message)."""
    problems = [f"parameter {name!r}" for name in _non_finite_parameters()]
    try:
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
        for where, trace in (("guide", guide_trace), ("model", model_trace)):
            trace.compute_log_prob()
            problems += [f"{where} site {name!r} log-probability" for name, site in trace.nodes.items()
                         if site["type"] == "sample" and "log_prob_sum" in site
                         and not bool(torch.isfinite(site["log_prob_sum"]))]
    except Exception as error:  # noqa: BLE001 - diagnosis must not hide the original problem
        problems.append(f"(the traces could not be computed: {str(error).splitlines()[0]})")
    return "non-finite: " + (", ".join(problems) if problems else "no single site or parameter (the sum overflowed)")


def _non_finite_parameters():
    return [name for name, value in pyro.get_param_store().named_parameters()
            if not bool(torch.isfinite(value).all())]


def _check_parameters_finite(step):
    bad = _non_finite_parameters()
    if bad:
        raise NonFiniteObjectiveError(f"step {step}: parameters became non-finite: {', '.join(bad)}")


