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

Both are pure: they change neither the model nor the guide. After
:func:`~pyro_esc.fit` with :class:`~pyro_esc.EntropyELBO` the model holds the
training data's lambda*, sigma^2*, so on the training data the two agree.
"""

import torch

from .objectives import AnalyticELBO, EntropyELBO


def training_elbo(model, guide, x):
    """L_H per data point: the ELBO at the lambda, sigma^2 that are optimal for ``x`` (pure).

    :param model: a :class:`~pyro_esc.SparseCoding`.
    :param guide: a Gaussian guide covering the points of ``x``.
    :param torch.Tensor x: data, shape (N, D).
    :rtype: float
    """
    with torch.no_grad():
        return -EntropyELBO().loss(model, guide, x) / x.size(0)


def held_out_elbo(model, guide, x):
    """The ELBO per data point at the model's trained lambda and sigma^2 (pure).

    Use it for held-out data: nothing is re-fitted to ``x``. The guide must
    describe the points of ``x`` (an amortised guide encodes any data; a
    per-point guide holds one posterior per point it was trained on).

    :param model: a trained :class:`~pyro_esc.SparseCoding`.
    :param guide: a Gaussian guide covering the points of ``x``.
    :param torch.Tensor x: data, shape (N, D).
    :rtype: float
    """
    with torch.no_grad():
        return -AnalyticELBO().loss(model, guide, x) / x.size(0)
