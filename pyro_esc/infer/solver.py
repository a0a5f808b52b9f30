r"""Per-point posteriors solved at a fixed model: :func:`solve_posteriors`.

With the model (W, lambda, sigma^2) held fixed, the ELBO is a sum over data points of
independent problems, one Gaussian q^(n) = Normal(nu, T) per point::

    F_n(nu, T) = H[q] - sum_h [log(2 lambda_h) + E_q|z_h| / lambda_h]
                 - D/2 log(2 pi sigma^2) - (||x - W nu||^2 + tr(W^T W T)) / (2 sigma^2)

(written for the Laplace prior; another prior of :mod:`pyro_esc.priors` replaces the prior term
by A(s_h) + c(s_h) E_q[phi(z_h)], and E|z_h|, its derivatives and 1 / lambda_h below by
E_q[phi(z_h)], its derivatives and the prior's penalty c(s_h)).

Each is small (H means and a diagonal or an H x H covariance), smooth and **concave**: in
the mean and the Cholesky factor (or the marginal scales) of q, E|z_h| = E|nu_h + (L eps)_h|
is convex, the entropy log det L concave and the quadratic terms concave, because the
Laplace prior and the Gaussian likelihood are log-concave (so is the Gaussian prior, for which
the optimum is the exact posterior and Newton's first full step reaches it). So every point has one optimum,
and Newton's method with a line search finds it. This module solves all points of a batch
at once, every point to its own tolerance, and exploits the structure:

- everything is in latent space: with G = W^T W (H x H) and b = W^T x,
  ||x - W nu||^2 = ||x||^2 - 2 nu^T b + nu^T G nu, so an iteration costs O(B H^2), not O(B D H);
- the covariance has an explicit stationarity condition given the mean: dF/dT = 0 gives::

      T^-1 = G / sigma^2 + diag(d),   d_h = g_h / (lambda_h tau_h),
      g_h = sqrt(2/pi) exp(-nu_h^2 / (2 tau_h^2)) = dE|z_h| / dtau_h,   tau_h^2 = T_hh

  and the same matrix is the Hessian of -F in the mean (E|z_h| has second derivative
  g_h / tau_h in nu_h), so one Cholesky factor gives both the covariance update and the
  Newton step of the mean (``covariance="full"``);
- for diagonal posteriors the Hessian in (nu, tau) has diagonal tau-blocks: eliminating tau
  (a Schur complement) leaves one H x H system G / sigma^2 + diag(d') per point, solved by
  Cholesky for small H and by conjugate gradients preconditioned with its diagonal for
  large H (``covariance="diag"``).

A point stops when its Newton decrement (half of it estimates the ELBO still to gain) is
below ``tol`` nats; the others go on. The result of a point does not depend on which other
points share its batch. Annealing weights (beta_q, beta_p, beta_x) enter as effective scales
lambda beta_q / beta_p and sigma^2 beta_q / beta_x (the weighted objective's optimum in q).
"""

import math
from typing import NamedTuple

import torch

from .._checks import check_data, check_int
from .._pyro_internals import own_parameters
from ..priors import get_prior
from ..variational.posterior import GaussianPosterior
from ..variational.semi_amortized import point_elbos

__all__ = ["COVARIANCES", "SolvedPosteriors", "solve_posteriors"]

#: The posterior families the solver knows.
COVARIANCES = ("diag", "full")
#: Default tolerance: half the Newton decrement, in nats per point.
DEFAULT_TOL = 1e-9
#: Default limit on Newton iterations per point.
DEFAULT_MAX_ITER = 100
#: Above this latent dimension the diagonal family's Newton systems are solved by conjugate gradients.
CG_LATENT_DIM = 16

#: Armijo's sufficient-increase fraction and the most step halvings a line search tries.
_ARMIJO = 1e-4
_HALVINGS = 40


class SolvedPosteriors(NamedTuple):
    """What :func:`solve_posteriors` returns.

    Example::

        >>> import pyro, torch
        >>> from pyro_esc import SparseCoding, solve_posteriors
        >>> pyro.clear_param_store()
        >>> model = SparseCoding(4, 3)
        >>> x = torch.randn(10, 4)
        >>> _ = model(x)                                 # the model initialises from the data it first sees
        >>> solved = solve_posteriors(model, x, covariance="full")
        >>> bool(solved.converged.all()), tuple(solved.elbo.shape), type(solved.posterior).__name__
        (True, (10,), 'FullGaussianPosterior')

    """

    posterior: GaussianPosterior  #: q for the B points, without gradient
    elbo: torch.Tensor  #: (B,) the standard ELBO of every point at the model's lambda, sigma^2
    converged: torch.Tensor  #: (B,) bool: the point met ``tol`` within ``max_iter`` iterations
    iterations: torch.Tensor  #: (B,) Newton iterations each point took


class _Model(NamedTuple):
    """The fixed model in the solver's terms (effective scales: annealing weights applied)."""

    gram: torch.Tensor  #: G = W^T W, (H, H)
    penalty: torch.Tensor  #: the prior's weight of phi at the effective scales (1 / lambda_eff for Laplace), (H,)
    precision: torch.Tensor  #: 1 / sigma^2_eff, a scalar
    prior: object  #: the :class:`~pyro_esc.priors.Prior`

    @property
    def gram_diagonal(self):
        return self.gram.diagonal()


def _quadratic(mean, projection, gram):
    """nu^T G nu - 2 nu^T b per point (||x - W nu||^2 up to ||x||^2), and G nu."""
    gram_mean = mean @ gram
    return (mean * gram_mean).sum(-1) - 2 * (mean * projection).sum(-1), gram_mean


# ---------------------------------------------------------------- the diagonal family


def _diag_objective(model, projection, mean, scale):
    # sum log tau - c . E phi(z) - s/2 (nu^T G nu - 2 nu^T b + sum_h G_hh tau_h^2): F up to constants.
    statistic = model.prior.expected_statistic(mean, scale)
    quadratic, _ = _quadratic(mean, projection, model.gram)
    trace = scale.square() @ model.gram_diagonal
    return scale.log().sum(-1) - statistic @ model.penalty - 0.5 * model.precision * (quadratic + trace)


def _diag_scale_at_zero_mean(model, like):
    # The optimal tau given nu = 0 (for Laplace: 1 = c g tau + s G_hh tau^2 with g = sqrt(2/pi)).
    scale = model.prior.posterior_scale_at_zero_mean(model.penalty, model.precision * model.gram_diagonal)
    return scale.to(like).expand_as(like).clone()


def _cg(gram, precision, diagonal, rhs, rtol, max_iter):
    """Solve (s G + diag(d)) v = rhs row by row: conjugate gradients from 0, Jacobi-preconditioned.

    Row n stops once its residual is at most ``rtol[n]`` times its right-hand side's norm. From 0 every
    iterate v_k is an ascent direction with rhs^T v_k = v_k^T A v_k > 0.
    """
    preconditioner = precision * gram.diagonal() + diagonal
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    target = (rtol * rhs.norm(dim=-1)).square()
    direction = residual / preconditioner
    product = (residual * direction).sum(-1)
    tiny = torch.finfo(rhs.dtype).tiny
    for _ in range(max_iter):
        running = residual.square().sum(-1) > target
        if not bool(running.any()):
            break
        applied = precision * (direction @ gram) + diagonal * direction
        curvature = (direction * applied).sum(-1)
        # Rows that are done (or whose direction vanished) take no further step.
        alpha = torch.where(running & (curvature > 0), product / curvature.clamp_min(tiny), torch.zeros_like(product))
        solution.addcmul_(alpha.unsqueeze(-1), direction)
        residual.addcmul_(alpha.unsqueeze(-1), applied, value=-1)
        preconditioned = residual / preconditioner
        new_product = (residual * preconditioned).sum(-1)
        beta = torch.where(product > 0, new_product / product.clamp_min(tiny), torch.zeros_like(product))
        direction = preconditioned + beta.unsqueeze(-1) * direction
        product = new_product
    return solution


def _forcing(rhs, preconditioner, tol):
    """How exactly to solve each Newton system (an inexact Newton method).

    With e ~ the ELBO still to gain (here the preconditioned gradient norm g^T M^-1 g, which
    estimates the Newton decrement), a relative residual eta costs about eta^2 e after the step,
    while Newton itself leaves about e^2: so eta = max(sqrt(e), sqrt(tol / e)), at most 0.1,
    loose far from the optimum and just tight enough for ``tol`` near it.
    """
    estimate = (rhs.square() / preconditioner).sum(-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    return torch.maximum(estimate.sqrt(), (tol / estimate).sqrt()).clamp(max=0.1)


def _solve_system(model, diagonal, rhs, use_cg, tol):
    if use_cg:
        rtol = _forcing(rhs, model.precision * model.gram_diagonal + diagonal, tol)
        return _cg(model.gram, model.precision, diagonal, rhs, rtol, max_iter=4 * rhs.size(-1))
    matrix = model.precision * model.gram + torch.diag_embed(diagonal)
    factor, _ = torch.linalg.cholesky_ex(matrix)
    return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)


def _diag_direction(model, projection, mean, scale, use_cg, tol):
    """The Newton direction in (nu, tau) and the slope of F along it (tau eliminated by its diagonal blocks)."""
    penalty, precision = model.penalty, model.precision
    _, d_mean, d_scale, d2_mean, d2_mean_scale, d2_scale = model.prior.statistic_derivatives(mean, scale)
    grad_mean = precision * (projection - mean @ model.gram) - penalty * d_mean
    grad_scale = 1 / scale - penalty * d_scale - precision * model.gram_diagonal * scale
    # -Hessian blocks: K_mm = s G + diag(c E''_nu), K_ms = diag(c E''_nu,tau), K_ss = diag(1 / tau^2 + c E''_tau + s G_hh)
    # (for Laplace E''_nu = g / tau, E''_nu,tau = -g nu / tau^2, E''_tau = g nu^2 / tau^3).
    curvature = penalty * d2_mean
    cross = penalty * d2_mean_scale
    scale_block = 1 / scale.square() + penalty * d2_scale + precision * model.gram_diagonal
    schur = (curvature - cross.square() / scale_block).clamp_min(0)
    step_mean = _solve_system(model, schur, grad_mean - cross / scale_block * grad_scale, use_cg, tol)
    step_scale = (grad_scale - cross * step_mean) / scale_block
    slope = (grad_mean * step_mean).sum(-1) + (grad_scale * step_scale).sum(-1)
    return step_mean, step_scale, slope


def _backtrack(evaluate, value, slope, alpha):
    """Per point, the first of alpha, alpha / 2, ... with Armijo's sufficient increase of F.

    ``evaluate(rows, alpha_rows)`` returns F at the trial points of ``rows`` and a tuple of
    by-products (per row) to keep for the accepted step. A point that finds no increase (its
    steps are below the objective's resolution) gets alpha 0 and keeps its value.

    :returns: ``(alpha, new value, by-products, accepted)``.
    """
    batch = value.size(0)
    alpha = alpha.clone()
    rows = torch.arange(batch, device=value.device)
    new_value = value.clone()
    accepted = torch.zeros(batch, dtype=torch.bool, device=value.device)
    # Rounding: an increase below a few ulps of F cannot be told from none.
    slack = 64 * torch.finfo(value.dtype).eps * (1 + value.abs())
    kept = None
    for _ in range(_HALVINGS + 1):
        trial, extras = evaluate(rows, alpha[rows])
        ok = (trial >= value[rows] + _ARMIJO * alpha[rows] * slope[rows] - slack[rows]) & torch.isfinite(trial)
        if kept is None:
            kept = tuple(torch.zeros((batch,) + tuple(extra.shape[1:]), dtype=extra.dtype, device=extra.device)
                         for extra in extras)
        good = rows[ok]
        new_value[good] = trial[ok]
        for store, extra in zip(kept, extras):
            store[good] = extra[ok]
        accepted[good] = True
        rows = rows[~ok]
        if rows.numel() == 0:
            break
        alpha[rows] = alpha[rows] / 2
    alpha[~accepted] = 0
    return alpha, new_value, kept, accepted


def _bookkeep(active, value, new_value, iterations, converged, slope, accepted, tol):
    """Record an iteration of the ``active`` points; returns those still active.

    A point is done when the Newton decrement (half the slope) is within ``tol``, or when its line search
    found no increase (it is at the objective's resolution; ``converged`` says which).
    """
    value[active] = new_value
    iterations[active] += 1
    small = 0.5 * slope <= tol
    converged[active] = small
    return active[~(small | ~accepted)]


def _largest_step(positive, step):
    """Per point, min(1, the largest alpha that keeps every entry of ``positive + alpha step`` above a tenth of
    its value)."""
    limit = torch.where(step < 0, 0.9 * positive / (-step).clamp_min(torch.finfo(positive.dtype).tiny),
                        torch.full_like(positive, math.inf))
    return limit.min(-1).values.clamp(max=1.0)


def _solve_diag(model, projection, mean, scale, tol, max_iter, use_cg):
    batch = mean.size(0)
    iterations = torch.zeros(batch, dtype=torch.long, device=mean.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=mean.device)
    active = torch.arange(batch, device=mean.device)
    value = _diag_objective(model, projection, mean, scale)
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        b, m, t = projection[active], mean[active], scale[active]
        step_mean, step_scale, slope = _diag_direction(model, b, m, t, use_cg, tol)
        alpha = _largest_step(t, step_scale)

        def evaluate(rows, alpha_rows):
            a = alpha_rows.unsqueeze(-1)
            return _diag_objective(model, b[rows], m[rows] + a * step_mean[rows], t[rows] + a * step_scale[rows]), ()

        alpha, new_value, _, accepted = _backtrack(evaluate, value[active], slope, alpha)
        mean[active] = m + alpha.unsqueeze(-1) * step_mean
        scale[active] = t + alpha.unsqueeze(-1) * step_scale
        active = _bookkeep(active, value, new_value, iterations, converged, slope, accepted, tol)
    return mean, scale, converged, iterations


# ---------------------------------------------------------------- the full-covariance family


def _full_state(model, projection, mean, diagonal):
    """T = (s G + diag(d))^-1 and F at (nu, T), up to constants; returns (F, T, marginal scales)."""
    precision_matrix = model.precision * model.gram + torch.diag_embed(diagonal)
    factor, info = torch.linalg.cholesky_ex(precision_matrix)
    covariance = torch.cholesky_inverse(factor)
    scale = covariance.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(mean.dtype).tiny).sqrt()
    statistic = model.prior.expected_statistic(mean, scale)
    quadratic, _ = _quadratic(mean, projection, model.gram)
    trace = (covariance * model.gram).sum((-2, -1))
    log_det = -2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    value = 0.5 * log_det - statistic @ model.penalty - 0.5 * model.precision * (quadratic + trace)
    value = torch.where(info == 0, value, torch.full_like(value, -math.inf))
    return value, covariance, scale


def _solve_full(model, projection, mean, scale, tol, max_iter):
    batch = mean.size(0)
    iterations = torch.zeros(batch, dtype=torch.long, device=mean.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=mean.device)
    # d parameterises the covariance: T = (s G + diag(d))^-1, the form of every optimum. Start from the
    # curvature of the prior term at the initial marginal scales (c g / tau for Laplace).
    diagonal = model.penalty * model.prior.statistic_derivatives(mean, scale)[3]
    value, covariance, scale = _full_state(model, projection, mean, diagonal)
    active = torch.arange(batch, device=mean.device)
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        b, m, d, cov, t = projection[active], mean[active], diagonal[active], covariance[active], scale[active]
        _, d_mean, _, d2_mean, _, _ = model.prior.statistic_derivatives(m, t)
        grad_mean = model.precision * (b - m @ model.gram) - model.penalty * d_mean
        # Newton in nu: the Hessian of -F in nu at the fixed point of d is T^-1, so the step is T grad.
        step_mean = (cov @ grad_mean.unsqueeze(-1)).squeeze(-1)
        # The fixed-point direction of d: dF = 1/2 u^T (T o T) u >= 0 along u = d* - d (an ascent direction).
        # d* = c dE/dtau / tau = c d2E/dnu2 (E of a Gaussian-smoothed phi solves the heat equation).
        step_diagonal = model.penalty * d2_mean - d
        slope = (grad_mean * step_mean).sum(-1) + 0.5 * (
            step_diagonal.unsqueeze(-2) @ cov.square() @ step_diagonal.unsqueeze(-1)).reshape(-1)
        alpha = _largest_step(d, step_diagonal)  # d stays > 0: T stays positive definite

        def evaluate(rows, alpha_rows):
            a = alpha_rows.unsqueeze(-1)
            trial_mean = m[rows] + a * step_mean[rows]
            trial_value, trial_cov, trial_scale = _full_state(model, b[rows], trial_mean,
                                                              d[rows] + a * step_diagonal[rows])
            return trial_value, (trial_cov, trial_scale)

        alpha, new_value, (new_cov, new_scale), accepted = _backtrack(evaluate, value[active], slope, alpha)
        a = alpha.unsqueeze(-1)
        mean[active] = m + a * step_mean
        diagonal[active] = d + a * step_diagonal
        covariance[active] = torch.where(accepted.view(-1, 1, 1), new_cov, cov)
        scale[active] = torch.where(accepted.unsqueeze(-1), new_scale, t)
        active = _bookkeep(active, value, new_value, iterations, converged, slope, accepted, tol)
    return mean, covariance, converged, iterations


# ---------------------------------------------------------------- the public function


def solve_posteriors(model, x, covariance="diag", *, init=None, tol=DEFAULT_TOL, max_iter=DEFAULT_MAX_ITER,
                     betas=(1.0, 1.0, 1.0), dtype=torch.float64):
    r"""Each point's Gaussian posterior at its optimum of the ELBO, with the model held fixed.

    For every row x^(n) of ``x``, maximises over q^(n) = Normal(nu, T) (diagonal or full T)::

        F_n = H[q] - sum_h [log(2 lambda_h) + E_q|z_h| / lambda_h]
              - D/2 log(2 pi sigma^2) - (||x - W nu||^2 + tr(W^T W T)) / (2 sigma^2)

    at the model's W, lambda and sigma^2 (none of which changes), by Newton's method with a
    backtracking line search, all points at once, each to its own tolerance (module docstring
    of :mod:`pyro_esc.solver`). Each F_n is concave, so the optimum is unique and a point's
    result does not depend on the other points of ``x``.

    This is the one place that brings posteriors to their optimum at a fixed model:
    :func:`~pyro_esc.encode`, :func:`~pyro_esc.denoising.denoise`, the scikit-learn estimator's
    ``transform``, :func:`~pyro_esc.reference_elbo` and the E-step of the EM route of
    :func:`~pyro_esc.fit` use it.

    Example::

        >>> import torch
        >>> from pyro_esc import SparseCoding, solve_posteriors
        >>> model = SparseCoding(data_dim=4, n_latents=3)
        >>> _ = torch.manual_seed(0); model.set_dictionary(torch.randn(4, 3))
        >>> solved = solve_posteriors(model, torch.randn(5, 4), covariance="full")
        >>> solved.posterior.mean.shape, bool(solved.converged.all())
        (torch.Size([5, 3]), True)

    :param model: a :class:`~pyro_esc.SparseCoding` (its dictionary, ``prior_scale`` and
        ``noise_var`` are read, never changed).
    :param x: data, shape (B, D) (a tensor or an array).
    :param str covariance: ``"diag"`` (q^(n) = Normal(nu, diag(tau^2))) or ``"full"``.
    :param init: optional starting point: a :class:`~pyro_esc.GaussianPosterior` of the B points
        (its means and marginal scales are used), e.g. the previous solution for the same points.
        Default: nu = 0 and the scales optimal for it.
    :param float tol: a point stops when half its Newton decrement, an estimate of the ELBO it
        would still gain, is at most ``tol`` nats.
    :param int max_iter: Newton iterations per point at most (points not done are reported in
        ``converged``).
    :param betas: annealing weights (beta_q, beta_p, beta_x) of the entropy form
        (:class:`~pyro_esc.annealing.Annealing`): the optimum of the weighted objective in q is
        the standard one at lambda beta_q / beta_p and sigma^2 beta_q / beta_x. ``elbo`` is always
        the unweighted ELBO.
    :param dtype: the dtype the solver computes in (default float64); the result has ``x``'s dtype.
    :returns: :class:`SolvedPosteriors` ``(posterior, elbo, converged, iterations)``.
    """
    from ..models.sparse_coding import SparseCoding

    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding, got {type(model).__name__}")
    x = check_data(x, "x", allow_numpy=True)
    if x.size(1) != model.data_dim:
        raise ValueError(f"x must have D = {model.data_dim} columns (the model's data_dim), got {x.size(1)}")
    with torch.no_grad(), own_parameters(model):  # the model's own W, lambda, sigma^2, whatever the store holds
        dictionary = model.dictionary.detach()
        prior_scale, noise_var = model.prior_scale.detach(), model.noise_var.detach()
    out_dtype = x.dtype if x.is_floating_point() else dictionary.dtype
    return solve_at(x, dictionary, prior_scale, noise_var, covariance, init=init, tol=tol, max_iter=max_iter,
                    betas=betas, dtype=dtype, out_dtype=out_dtype, prior=model.prior)


@torch.no_grad()
def solve_at(x, dictionary, prior_scale, noise_var, covariance="diag", *, init=None, tol=DEFAULT_TOL,
             max_iter=DEFAULT_MAX_ITER, betas=(1.0, 1.0, 1.0), dtype=torch.float64, out_dtype=None, fresh=None,
             prior="laplace"):
    """:func:`solve_posteriors` at explicit W (D, H), prior scales (H,) and sigma^2 (a scalar).

    :param torch.Tensor fresh: optional (B,) bool: rows of ``init`` to ignore (they start from the default).
    :param prior: the :class:`~pyro_esc.priors.Prior` (or its name) the scales belong to.
    """
    prior = get_prior(prior)
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    max_iter = check_int(max_iter, "max_iter")
    beta_q, beta_p, beta_x = (float(beta) for beta in betas)
    if not min(beta_q, beta_p, beta_x) > 0:
        raise ValueError(f"betas must be three numbers > 0, got {betas!r}")
    out_dtype = out_dtype or x.dtype
    like = dict(dtype=dtype, device=dictionary.device)
    x_work = x.to(**like)
    dictionary, prior_scale, noise_var = (value.to(**like) for value in (dictionary, prior_scale, noise_var))
    model = _Model(gram=dictionary.T @ dictionary, penalty=(beta_p / beta_q) * prior.penalty(prior_scale),
                   precision=beta_x / (beta_q * noise_var), prior=prior)
    projection = x_work @ dictionary
    mean = torch.zeros_like(projection)
    scale = _diag_scale_at_zero_mean(model, mean)
    if init is not None:
        if not isinstance(init, GaussianPosterior) or init.is_joint or tuple(init.mean.shape) != tuple(
                projection.shape):
            raise ValueError(f"init must be a per-point GaussianPosterior of {tuple(projection.shape)} means, "
                             f"got {init!r}")
        given = torch.ones(mean.size(0), dtype=torch.bool, device=mean.device) if fresh is None else ~fresh
        mean = torch.where(given.unsqueeze(-1), init.mean.detach().to(**like), mean)
        scale = torch.where(given.unsqueeze(-1), init.stddev.detach().to(**like).clamp_min(torch.finfo(dtype).tiny),
                            scale)
    if covariance == "diag":
        use_cg = dictionary.size(1) > CG_LATENT_DIM
        mean, scale, converged, iterations = _solve_diag(model, projection, mean, scale, tol, max_iter, use_cg)
        posterior = GaussianPosterior.from_scale(mean, scale)
    else:
        mean, cov, converged, iterations = _solve_full(model, projection, mean, scale, tol, max_iter)
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        posterior = GaussianPosterior.from_covariance(mean, cov)
    # The standard ELBO of every point at the model's scales (unweighted), by the one per-point formula.
    elbo = point_elbos(posterior, x_work, dictionary, prior_scale, noise_var, prior)
    return SolvedPosteriors(posterior.to(out_dtype), elbo.to(out_dtype), converged, iterations)
