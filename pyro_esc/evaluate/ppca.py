r"""Probabilistic PCA in closed form (Tipping & Bishop 1999): the exact reference for ``prior="gaussian"``.

With a Gaussian prior, :class:`~pyro_esc.SparseCoding` is probabilistic PCA without a mean::

    z ~ Normal(0, diag(s^2)),   x | z ~ Normal(W z, sigma^2 I_D),   so   x ~ Normal(0, C),  C = W diag(s^2) W^T + sigma^2 I

Its maximum-likelihood solution is known in closed form from the eigenvalues l_1 >= ... >= l_D
and eigenvectors u_j of the second-moment matrix S = X^T X / N::

    sigma^2_ML = 1/(D - H) sum_{j > H} l_j                 (the mean of the discarded eigenvalues)
    W_ML diag(s_ML) = U_H (L_H - sigma^2_ML I)^(1/2) R     (any rotation R)
    log p(x) per point at the optimum = -1/2 [ D log(2 pi) + sum_{j <= H} log l_j + (D - H) log sigma^2_ML + D ]

The true posterior of every point is Gaussian, so with per-point full covariances the ELBO equals
the log-likelihood at its optimum: :func:`~pyro_esc.fit` with ``prior="gaussian"`` and a
:class:`~pyro_esc.LocalMultivariateNormal` guide must reach :func:`ppca_maximum_likelihood`'s
value, which makes PPCA an end-to-end test of the whole machine (tests/test_ppca.py).

Example::

    >>> import torch
    >>> from pyro_esc.evaluate.ppca import ppca_maximum_likelihood
    >>> x = torch.randn(500, 5, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    >>> solution = ppca_maximum_likelihood(x, n_latents=2)
    >>> solution.dictionary.shape, solution.prior_scale.shape
    (torch.Size([5, 2]), torch.Size([2]))
"""

import math
from typing import NamedTuple

import torch

from .._checks import check_data, check_int
from .._pyro_internals import own_parameters

__all__ = ["PPCASolution", "ppca_log_likelihood", "ppca_maximum_likelihood"]


class PPCASolution(NamedTuple):
    """The maximum-likelihood PPCA model, in :class:`~pyro_esc.SparseCoding`'s parametrisation."""

    dictionary: torch.Tensor  #: W (D, H): the leading eigenvectors (unit columns)
    prior_scale: torch.Tensor  #: s (H,): sqrt(l_h - sigma^2)
    noise_var: torch.Tensor  #: sigma^2: the mean of the discarded eigenvalues
    log_likelihood: torch.Tensor  #: the maximum log-likelihood per data point
    eigenvalues: torch.Tensor  #: l (D,), in decreasing order


def ppca_maximum_likelihood(x, n_latents):
    """The closed-form maximum-likelihood PPCA model of data ``x`` (N, D) with H = ``n_latents`` latents.

    :raises ValueError: unless 1 <= H < D and the H-th eigenvalue exceeds the mean of the discarded
        ones (otherwise a latent's variance is 0 at the optimum and the model is degenerate).
    """
    x = check_data(x, "x", allow_numpy=True).to(torch.float64)
    n, dim = x.shape
    n_latents = check_int(n_latents, "n_latents")
    if n_latents >= dim:
        raise ValueError(f"n_latents must be below the data's dimension D = {dim}, got {n_latents}")
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x / n)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    noise_var = eigenvalues[n_latents:].mean()
    kept = eigenvalues[:n_latents]
    if not bool(kept[-1] > noise_var):
        raise ValueError(f"the {n_latents}-th eigenvalue ({float(kept[-1]):g}) does not exceed the mean of the "
                         f"discarded ones ({float(noise_var):g}): fewer latents explain the data as well")
    log_likelihood = -0.5 * (dim * math.log(2 * math.pi) + kept.log().sum() + (dim - n_latents) * noise_var.log()
                             + dim)
    return PPCASolution(eigenvectors[:, :n_latents], (kept - noise_var).sqrt(), noise_var, log_likelihood,
                        eigenvalues)


def ppca_log_likelihood(model, x):
    """The exact log p(x^(n)) of every point under a Gaussian-prior model: x ~ Normal(0, W diag(s^2) W^T + sigma^2 I).

    :param model: a :class:`~pyro_esc.SparseCoding` with ``prior="gaussian"``.
    :param x: data (N, D).
    :returns: (N,) in float64.
    """
    from ..priors import Gaussian

    if not isinstance(getattr(model, "prior", None), Gaussian):
        raise ValueError(f"ppca_log_likelihood needs a SparseCoding with prior='gaussian', got "
                         f"{getattr(model, 'prior', type(model).__name__)!r}")
    x = check_data(x, "x", allow_numpy=True).to(torch.float64)
    with torch.no_grad(), own_parameters(model):  # its own W, s, sigma^2, whatever the store holds
        dictionary = model.dictionary.detach().to(torch.float64)
        scale = model.prior_scale.detach().to(torch.float64)
        noise_var = model.noise_var.detach().to(torch.float64)
    loading = dictionary * scale
    covariance = loading @ loading.T + noise_var * torch.eye(x.size(1), dtype=torch.float64)
    return torch.distributions.MultivariateNormal(torch.zeros(x.size(1), dtype=torch.float64),
                                                  covariance_matrix=covariance).log_prob(x)
