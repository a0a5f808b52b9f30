"""A gold-standard posterior to judge guides by: NUTS on z with the model's parameters fixed.

For a few chosen data points, :func:`nuts_posterior` samples the exact
posterior p(z | x^(n)) of :class:`~pyro_esc.SparseCoding` (lambda, W and
sigma^2 held at their current values) with Pyro's NUTS and returns an ArviZ
``InferenceData`` with its diagnostics (split r_hat, effective sample sizes,
divergences). :func:`guide_inference_data` exports any guide's posterior for
the same points to ``InferenceData`` too, and :func:`compare_to_reference`
reports, per guide, how far its posterior means, marginal standard deviations
and correlations are from NUTS.

InferenceData layout (both kinds): group ``posterior`` holds ``z`` with dims
(chain, draw, point, latent), where ``point`` are the indices of the chosen
data points in x. For NUTS, ``sample_stats`` holds ``diverging``,
``observed_data`` the points ``x`` and ``constant_data`` the fixed model
parameters. For a per-point Gaussian guide, ``constant_data`` holds its exact
moments ``q_mean`` (point, latent) and ``q_covariance`` (point, latent,
latent_2), which the comparison uses instead of the draws.
"""

import warnings

import numpy as np
import torch

import pyro
from pyro import poutine
from pyro.infer import MCMC, NUTS

from .._checks import check_data, check_int, check_subsample
from .._pyro_internals import own_parameters
from ..models.sparse_coding import SparseCoding
from ..variational.posterior import gaussian_posterior
from .likelihood import seeded

#: Thresholds above/below which :func:`nuts_posterior` warns.
MAX_R_HAT = 1.05
MIN_ESS = 100


def _arviz():
    # Imported on use: ArviZ is heavy and announces its refactor with a FutureWarning on import.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def nuts_posterior(model, x, points, num_samples=500, warmup_steps=500, num_chains=2, seed=0,
                   target_accept_prob=0.8, max_tree_depth=10, full_mass=True, progress=True):
    """Sample p(z | x^(n)) for the chosen points with NUTS, model parameters fixed; return InferenceData.

    ::

        U(z) = -sum_{n in points} [ sum_h log Laplace(z_nh; 0, lambda_h) + log Normal(x_n; W z_n, sigma^2 I) ]
             = sum_{n in points} [ sum_h |z_nh| / lambda_h + ||x_n - W z_n||^2 / (2 sigma^2) ] + const

    for the Laplace prior; for the model's prior in general ``sum_h c(s_h) phi(z_nh)`` replaces
    ``sum_h |z_nh| / lambda_h`` (:mod:`pyro_esc.priors`).

    One NUTS run samples all chosen points' latents jointly (they are
    independent given the parameters; the diagonal mass matrix adapts to each).
    The Laplace prior's kinks on the axes make U non-smooth there; NUTS copes,
    but check the diagnostics. Chains run one after another (no
    multiprocessing), chain c seeded with ``seed + c``, each started from the
    ridge solution of its points plus prior-scaled noise (overdispersed, so
    r_hat means something). A warning is issued if the largest r_hat exceeds
    :data:`MAX_R_HAT`, the smallest bulk ESS is below :data:`MIN_ESS`, or a
    transition diverged; these numbers are also in ``posterior.attrs``.

    :param model: a :class:`~pyro_esc.SparseCoding` (its current lambda, W, sigma^2 are used).
    :param torch.Tensor x: all N data points, shape (N, D).
    :param points: indices of the data points to sample (a 1-D integer tensor or sequence).
    :param int num_samples: draws kept per chain.
    :param int warmup_steps: adaptation steps per chain (discarded).
    :param int num_chains: chains (at least 2 for r_hat).
    :param int seed: base seed (the global RNG is left untouched); None uses torch's global RNG.
    :param float target_accept_prob: NUTS's step-size adaptation target.
    :param int max_tree_depth: NUTS's maximum tree depth.
    :param bool full_mass: adapt a dense mass matrix (default), which matters when columns of W
        overlap or are linearly dependent (bars: the sum of the horizontal bars equals the sum
        of the vertical ones, a direction only the prior constrains); False adapts a diagonal one.
    :param bool progress: show Pyro's progress bar.
    :rtype: arviz.InferenceData
    """
    if not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding, got {type(model).__name__}")
    x, _ = model.resolve_data(x)
    points = _check_points(points, x)
    num_samples = check_int(num_samples, "num_samples")
    warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=0)
    num_chains = check_int(num_chains, "num_chains")
    max_tree_depth = check_int(max_tree_depth, "max_tree_depth")
    if seed is not None:
        seed = check_int(seed, "seed", minimum=0)
    if not 0 < target_accept_prob < 1:
        raise ValueError(f"target_accept_prob must be in (0, 1), got {target_accept_prob!r}")

    with torch.no_grad(), own_parameters(model):  # its own W, lambda, sigma^2, whatever the store holds
        dictionary = model.dictionary.detach()
        prior_scale, noise_var = model.prior_scale.detach(), model.noise_var.detach()
    x_points = x.index_select(0, points)
    # The negative log joint up to its constant (NUTS needs none): plain tensor operations,
    # because the potential and its gradient run thousands of times.
    prior = model.prior
    penalty = prior.penalty(prior_scale)
    half_precision = 0.5 / noise_var

    def potential(params):
        z = params["z"]
        return (prior.statistic(z) @ penalty).sum() + half_precision * (x_points - z @ dictionary.T).square().sum()

    # The ridge start: the posterior mean under a Normal(0, s^2) prior at the prior's scales (exact for the Gaussian).
    gram = dictionary.T @ dictionary + torch.diag(noise_var / prior_scale.square())
    ridge = torch.linalg.solve(gram, dictionary.T @ x_points.T).T  # (P, H)

    draws, diverging = [], []
    for chain in range(num_chains):
        with seeded(None if seed is None else seed + chain, x.device):
            start = ridge + prior_scale * torch.randn_like(ridge)
            kernel = NUTS(potential_fn=potential, target_accept_prob=target_accept_prob,
                          max_tree_depth=max_tree_depth, full_mass=full_mass)
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                        initial_params={"z": start}, disable_progbar=not progress)
            mcmc.run()
        draws.append(mcmc.get_samples()["z"].detach().cpu().numpy())
        flags = np.zeros(num_samples, dtype=bool)
        flags[list(mcmc.diagnostics()["divergences"]["chain 0"])] = True
        diverging.append(flags)

    az = _arviz()
    n_latents, dim = dictionary.shape[1], dictionary.shape[0]
    idata = az.from_dict(
        posterior={"z": np.stack(draws)},
        sample_stats={"diverging": np.stack(diverging)},
        observed_data={"x": x_points.cpu().numpy()},
        constant_data={"dictionary": dictionary.cpu().numpy(), "prior_scale": prior_scale.cpu().numpy(),
                       "noise_var": noise_var.cpu().numpy()},
        coords=_coords(points, n_latents, dim),
        dims={"z": ["point", "latent"], "x": ["point", "pixel"], "dictionary": ["pixel", "latent"],
              "prior_scale": ["latent"]},
    )
    attrs = idata.posterior.attrs
    attrs.update(inference="NUTS", warmup_steps=warmup_steps, seed=-1 if seed is None else seed)
    if num_chains > 1:
        attrs["max_r_hat"] = float(az.rhat(idata, var_names=["z"])["z"].max())
    attrs["min_ess_bulk"] = float(az.ess(idata, var_names=["z"], method="bulk")["z"].min())
    attrs["num_divergent"] = int(np.sum(diverging))
    problems = []
    if attrs.get("max_r_hat", 1.0) > MAX_R_HAT:
        problems.append(f"max r_hat {attrs['max_r_hat']:.3f} > {MAX_R_HAT}")
    if attrs["min_ess_bulk"] < MIN_ESS:
        problems.append(f"min bulk ESS {attrs['min_ess_bulk']:.0f} < {MIN_ESS}")
    if attrs["num_divergent"]:
        problems.append(f"{attrs['num_divergent']} divergent transitions")
    if problems:
        warnings.warn("NUTS reference may be unreliable: " + "; ".join(problems)
                      + " (run longer, or raise target_accept_prob)", RuntimeWarning, stacklevel=2)
    return idata


def diagnostics(idata):
    """ArviZ's convergence table for ``z``: mcse_mean, mcse_sd, ess_bulk, ess_tail, r_hat per (point, latent).

    :param arviz.InferenceData idata: from :func:`nuts_posterior` (or :func:`guide_inference_data`).
    :rtype: pandas.DataFrame
    """
    _check_idata(idata, "idata")
    return _arviz().summary(idata, var_names=["z"], kind="diagnostics")


def guide_inference_data(guide, x, points, num_draws=1000, seed=0):
    """Export a guide's posterior q(z | x^(n)) for the chosen points to InferenceData.

    A guide with per-point Gaussians (read through
    :func:`~pyro_esc.posterior.gaussian_posterior`) gives draws from those
    Gaussians and, in ``constant_data``, their exact moments ``q_mean`` and
    ``q_covariance``. Any other guide (a joint Gaussian such as
    AutoMultivariateNormal, or a non-Gaussian one) is run ``num_draws`` times,
    vectorised, and only its draws of the ``"z"`` site are exported.

    :param guide: a guide for :class:`~pyro_esc.SparseCoding`, called as ``guide(x)``.
    :param torch.Tensor x: all N data points, shape (N, D).
    :param points: indices of the data points to export.
    :param int num_draws: draws (one chain).
    :param int seed: seed for the draws (the global RNG is left untouched); None uses the global RNG.
    :rtype: arviz.InferenceData
    """
    x = check_data(x, "x")
    points = _check_points(points, x)
    num_draws = check_int(num_draws, "num_draws")
    if seed is not None:
        seed = check_int(seed, "seed", minimum=0)
    constant = {}
    with torch.no_grad(), seeded(seed, x.device):
        try:
            posterior = gaussian_posterior(guide, x)
        except ValueError:
            posterior = None  # not a Gaussian guide the protocol knows: sample it
        if posterior is not None and not posterior.is_joint:
            if posterior.num_points != x.size(0):
                raise ValueError(f"the guide's posterior covers {posterior.num_points} points, x has {x.size(0)}")
            chosen = posterior.index_select(points)
            z = chosen.per_point_distribution().sample((num_draws,))
            constant = {"q_mean": chosen.mean.cpu().numpy(),
                        "q_covariance": chosen.covariance_matrices().cpu().numpy()}
        else:
            with poutine.block(), pyro.plate("draws", num_draws, dim=-2):
                z = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
            z = z.reshape(num_draws, x.size(0), -1).index_select(1, points)
    n_latents = z.size(-1)
    return _arviz().from_dict(
        posterior={"z": z.cpu().numpy()[None]},
        constant_data=constant or None,
        coords={**_coords(points, n_latents), "latent_2": np.arange(n_latents)},
        dims={"z": ["point", "latent"], "q_mean": ["point", "latent"],
              "q_covariance": ["point", "latent", "latent_2"]},
    )


def posterior_moments(idata):
    """Posterior means (P, H), marginal standard deviations (P, H) and correlation matrices (P, H, H).

    Exact moments from ``constant_data`` (``q_mean``, ``q_covariance``) when present,
    otherwise sample moments of the draws of ``z`` pooled over chains.

    :param arviz.InferenceData idata: from :func:`nuts_posterior` or :func:`guide_inference_data`.
    """
    _check_idata(idata, "idata")
    constant = getattr(idata, "constant_data", None)
    if constant is not None and "q_mean" in constant:
        mean = constant["q_mean"].values
        covariance = constant["q_covariance"].values
    else:
        draws = idata.posterior["z"].transpose("chain", "draw", "point", "latent").values
        draws = draws.reshape(-1, *draws.shape[2:])
        mean = draws.mean(0)
        centred = draws - mean
        covariance = np.einsum("spi,spj->pij", centred, centred) / (draws.shape[0] - 1)
    std = np.sqrt(np.diagonal(covariance, axis1=-2, axis2=-1))
    correlation = covariance / (std[:, :, None] * std[:, None, :])
    return mean, std, correlation


def compare_to_reference(reference, approximations):
    """Per approximation, the errors of posterior means, standard deviations and correlations against a reference.

    With nu, s, R the mean, marginal standard deviations and correlation
    matrix per point (reference: no subscript; approximation: subscript q),
    over the P points and H latents::

        mean_rmse      = sqrt( mean_{n,h} (nu_q - nu)^2 )
        std_rmse       = sqrt( mean_{n,h} (s_q - s)^2 )
        std_log_ratio  = mean_{n,h} log(s_q / s)        (< 0: too narrow, as mean-field VI tends to be)
        corr_mae       = mean_{n, h < k} |R_q - R|_hk
        corr_frobenius = mean_n ||R_q - R||_F

    :param arviz.InferenceData reference: the gold standard, e.g. from :func:`nuts_posterior`.
    :param dict approximations: name -> InferenceData (e.g. from :func:`guide_inference_data`)
        for the same points.
    :returns: one row per approximation; ``attrs["reference_mean_mcse"]`` holds the root mean
        square Monte Carlo error of the reference's means (the floor below which mean errors
        are noise).
    :rtype: pandas.DataFrame
    """
    import pandas as pd

    _check_idata(reference, "reference")
    if not isinstance(approximations, dict) or not approximations:
        raise ValueError("approximations must be a non-empty dict of name -> InferenceData")
    points = reference.posterior["point"].values
    mean, std, correlation = posterior_moments(reference)
    upper = np.triu_indices(mean.shape[1], k=1)
    rows = {}
    for name, idata in approximations.items():
        _check_idata(idata, f"approximations[{name!r}]")
        if not np.array_equal(idata.posterior["point"].values, points):
            raise ValueError(f"approximations[{name!r}] covers points {idata.posterior['point'].values.tolist()}, "
                             f"the reference {points.tolist()}")
        mean_q, std_q, correlation_q = posterior_moments(idata)
        if mean_q.shape != mean.shape:
            raise ValueError(f"approximations[{name!r}] has z of shape {mean_q.shape}, the reference {mean.shape}")
        difference = correlation_q - correlation
        rows[name] = {
            "mean_rmse": float(np.sqrt(np.mean((mean_q - mean) ** 2))),
            "std_rmse": float(np.sqrt(np.mean((std_q - std) ** 2))),
            "std_log_ratio": float(np.mean(np.log(std_q / std))),
            "corr_mae": float(np.mean(np.abs(difference[:, upper[0], upper[1]]))) if upper[0].size else 0.0,
            "corr_frobenius": float(np.mean(np.sqrt((difference ** 2).sum((-2, -1))))),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    mcse = _arviz().mcse(reference, var_names=["z"], method="mean")["z"].values
    table.attrs["reference_mean_mcse"] = float(np.sqrt(np.mean(mcse ** 2)))
    return table


def _check_points(points, x):
    points = check_subsample(points, x.size(0), name="points")
    if points is None:
        raise ValueError("points must select data points, got None")
    if torch.unique(points).numel() != points.numel():
        raise ValueError(f"points must not repeat, got {points.tolist()}")
    return points.to(x.device)


def _check_idata(idata, name):
    posterior = getattr(idata, "posterior", None)
    if posterior is None or "z" not in posterior or set(posterior["z"].dims) != {"chain", "draw", "point", "latent"}:
        raise ValueError(f"{name} must be an InferenceData whose posterior holds z with dims "
                         f"(chain, draw, point, latent), as nuts_posterior and guide_inference_data make")


def _coords(points, n_latents, dim=None):
    coords = {"point": points.cpu().numpy(), "latent": np.arange(n_latents)}
    if dim is not None:
        coords["pixel"] = np.arange(dim)
    return coords
