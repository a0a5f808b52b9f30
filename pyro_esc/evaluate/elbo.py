"""Which ELBO is which: the numbers to report after training.

Two different numbers are both called "the ELBO" of a trained model, and they
differ on purpose:

- :func:`training_elbo`: L_H, the ELBO per data point with lambda and sigma^2 at
  their optimum *for the data evaluated* (Theorem 2), i.e. ``-EntropyELBO().loss /
  N``. On the training data this is the objective training maximised.
- :func:`held_out_elbo`: the standard ELBO per data point at the model's
  *trained* lambda and sigma^2 (``-AnalyticELBO().loss / N``). On held-out data
  this is the honest number: re-fitting lambda and sigma^2 to the test data, as
  L_H would, makes the test ELBO optimistic.

Both are pure: they change neither the model nor the guide, and they read the parameters of
the model and guide they are given, whatever param-store scope they are called in. A per-point
guide that :func:`~pyro_esc.fit` trained is tied to its data: evaluating it on other data is an
error, not a number. A third number
judges learning itself: :func:`reference_elbo`, the ELBO that a given (e.g. the
generating) dictionary allows, with the posteriors fitted to it. After
:func:`~pyro_esc.fit` with :class:`~pyro_esc.EntropyELBO` the model holds the
training data's lambda*, sigma^2*, so on the training data the two agree.
"""

import torch

from .._pyro_internals import own_parameters
from ..infer.objectives import AnalyticELBO, EntropyELBO, analytic_elbo_per_point, entropy_elbo_per_point  # noqa: F401
from ..models.sparse_coding import SparseCoding
from ..train._isolation import check_tied_to, isolated
from ..train.loop import fit
from ..variational.guides import covariance_family
from ..variational.registry import make_guide


def training_elbo(model, guide, x):
    """L_H per data point: the ELBO at the lambda, sigma^2 that are optimal for ``x`` (pure).

    Example::

        >>> import pyro
        >>> from pyro_esc import LocalMultivariateNormal, SparseCoding, fit, training_elbo
        >>> from pyro_esc.data import bars
        >>> pyro.clear_param_store()
        >>> x, _ = bars(100, seed=0)
        >>> model = SparseCoding(25, 10)
        >>> guide = LocalMultivariateNormal(model)
        >>> history = fit(model, guide, x, steps=20, tol=None, progress=False)
        >>> abs(training_elbo(model, guide, x) - history.final_elbo) < 1e-4   # the ELBO fit reported
        True

    :param model: a :class:`~pyro_esc.SparseCoding`.
    :param guide: a Gaussian guide covering the points of ``x``.
    :param torch.Tensor x: data, shape (N, D).
    :rtype: float
    """
    _check_evaluable(model, guide, x, "training_elbo")
    with own_parameters(model, guide):
        return entropy_elbo_per_point(model, guide, x)


def held_out_elbo(model, guide, x):
    """The ELBO per data point at the model's trained lambda and sigma^2 (pure).

    Use it for held-out data: nothing is re-fitted to ``x``. The guide must
    describe the points of ``x`` (an amortised guide encodes any data; a
    per-point guide holds one posterior per point it was trained on).

    Example::

        >>> import pyro
        >>> from pyro_esc import LocalMultivariateNormal, SparseCoding, fit, held_out_elbo, training_elbo
        >>> from pyro_esc.data import bars
        >>> pyro.clear_param_store()
        >>> x, _ = bars(200, seed=0)
        >>> model = SparseCoding(25, 10)
        >>> guide = LocalMultivariateNormal(model)
        >>> history = fit(model, guide, x, progress=False)
        >>> abs(training_elbo(model, guide, x) - history.final_elbo) < 1e-4      # the ELBO fit reported
        True
        >>> abs(held_out_elbo(model, guide, x) - history.final_elbo) < 1e-4      # at fit's scales, the same ELBO
        True

    :param model: a trained :class:`~pyro_esc.SparseCoding`.
    :param guide: a Gaussian guide covering the points of ``x``.
    :param torch.Tensor x: data, shape (N, D).
    :rtype: float
    """
    _check_evaluable(model, guide, x, "held_out_elbo")
    with own_parameters(model, guide):
        return analytic_elbo_per_point(model, guide, x)


def _check_evaluable(model, guide, x, where):
    if guide is None:
        raise ValueError(f"{where}: guide must be the trained guide (or encode(model, guide, x) for new data), "
                         f"got None")
    if isinstance(x, torch.Tensor):
        check_tied_to(guide, x, where)


def reference_elbo(x, dictionary, guide="local-full", seed=0, prior="laplace", **fit_options):
    """The ELBO per data point that a given dictionary allows: a yardstick for learning.

    The dictionary is held fixed at ``dictionary`` (e.g. the generating one of
    an artificial data set); the posteriors and lambda, sigma^2 are brought to their
    joint optimum by :func:`~pyro_esc.fit`'s EM route with the dictionary fixed:
    every point's posterior solved (:func:`~pyro_esc.solver.solve_posteriors`), then
    Theorem 2's lambda*, sigma^2*, until the ELBO stops changing (``tol``). A learned
    dictionary whose ELBO is below this one has not found the best optimum the data
    offer; one above it explains the data better than the reference.

    The fit runs in float64 whatever the data's dtype (a yardstick must not stop
    early), in a param-store scope of its own, and restores the RNG state, so the
    caller's parameters and random stream are untouched.

    Example::

        >>> import pyro
        >>> from pyro_esc import reference_elbo
        >>> from pyro_esc.data import bars
        >>> pyro.clear_param_store()
        >>> x, true_dictionary = bars(100, seed=0)
        >>> reference = reference_elbo(x, true_dictionary, progress=False)   # posteriors fitted at the true W
        >>> -30 < reference < -20
        True

    :param torch.Tensor x: data, shape (N, D).
    :param torch.Tensor dictionary: W, shape (D, H) (columns are normalised).
    :param guide: ``"local-full"`` (a full-covariance Gaussian per point), ``"local-diag"``, or a
        callable ``model -> guide`` (a guide the EM route does not solve is fitted with L-BFGS).
    :param int seed: seed for the guide's initialisation.
    :param prior: the model's prior (a name or a :class:`~pyro_esc.priors.Prior`; default Laplace).
    :param fit_options: further arguments of :func:`~pyro_esc.fit` (e.g. ``steps``, ``tol``; default
        ``tol=1e-9``).
    :rtype: float
    """
    x = x.to(torch.float64)
    dictionary = torch.as_tensor(dictionary).to(x)
    if dictionary.dim() != 2 or dictionary.size(0) != x.size(1):
        raise ValueError(f"dictionary must have shape (D, H) = ({x.size(1)}, H), got {tuple(dictionary.shape)}")
    if not callable(guide) and guide not in ("local-full", "local-diag"):
        raise ValueError(f"guide must be 'local-full', 'local-diag' or a callable model -> guide, got {guide!r}")
    build = guide if callable(guide) else (lambda model: make_guide(guide, model))
    with isolated():
        model = SparseCoding(x.size(1), dictionary.size(1), prior=prior).to(dtype=x.dtype, device=x.device)
        model.set_dictionary(dictionary)
        fit_options.setdefault("progress", False)
        fit_options.setdefault("tol", 1e-9)
        guide_object = build(model)
        fit_options.setdefault("optimizer", "em" if covariance_family(guide_object) is not None else "lbfgs")
        history = fit(model, guide_object, x, train_dictionary=False, seed=seed, **fit_options)
    return history.final_elbo
