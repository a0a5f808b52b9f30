"""Independent routes that the tests compare the closed-form code against, and the one
registry of the guides that the tests run by name (:data:`GUIDES`, :func:`guide_problem`)."""

import functools
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.poutine.util import prune_subsample_sites

#: The user guide's page on extending the library: its examples are run here as written.
EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "guide" / "extending.md"


def randomize_guide(guide, *args, scale=0.3, seed=1, **kwargs):
    """Run the guide once (lazy setup), then move every parameter it owns to a random value.

    Testing only at initialisation could hide errors that vanish there (e.g. unit
    scales or zero means); random unconstrained values exercise every term.
    """
    guide(*args, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in pyro.get_param_store().named_parameters():
            if not name.startswith(guide._pyro_name):
                continue
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            # An encoder's skip connection multiplies the raw data (bars of a few units): the same noise
            # there would spread the posterior scales over five decades, where a Monte Carlo check of a
            # few thousand particles is all tail and tells nothing.
            value.add_((scale / 3 if ".skip_layer." in name else scale) * noise)


def trace_elbo_loss(model, guide, *args, num_particles=2000, **kwargs):
    """Pyro's own Monte Carlo estimate of the loss (-sum_n ELBO_n), vectorised particles."""
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        return elbo.loss(model, guide, *args, **kwargs)


def per_particle_losses(model, guide, *args, num_particles=2000, **kwargs):
    """Single-particle losses -log p(x, z) + log q(z), one per particle.

    Used for the standard error of the Monte Carlo estimate (std / sqrt(P)).
    """
    vectorize = pyro.plate("particles", num_particles, dim=-2)
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(vectorize(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(vectorize(model), trace=guide_trace)).get_trace(*args, **kwargs)
        return _particle_sums(model_trace, guide_trace, num_particles)


def _particle_sums(model_trace, guide_trace, num_particles):
    total = torch.zeros(num_particles, dtype=torch.float64)
    for trace, sign in ((model_trace, -1.0), (guide_trace, 1.0)):
        trace = prune_subsample_sites(trace)
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] != "sample" or "log_prob" not in site:
                continue
            log_prob = site["log_prob"]
            if not isinstance(log_prob, torch.Tensor) or log_prob.dim() == 0:
                total += sign * float(log_prob)
                continue
            # particle dimension first; sum the rest (data plate, event)
            log_prob = log_prob.reshape(log_prob.shape[0], -1) if log_prob.shape[0] == num_particles \
                else log_prob.reshape(1, -1).expand(num_particles, -1)
            total += sign * log_prob.sum(-1).double()
    return total


def monte_carlo_check(model, guide, *args, num_particles=2000, **kwargs):
    """(Trace_ELBO loss, its standard error) from two independent sets of particles."""
    value = trace_elbo_loss(model, guide, *args, num_particles=num_particles, **kwargs)
    losses = per_particle_losses(model, guide, *args, num_particles=num_particles, **kwargs)
    return value, float(losses.std() / num_particles ** 0.5), float(losses.mean())


def guide_parameters(guide):
    """The guide's (name, unconstrained tensor) pairs from the param store."""
    return [(name, value) for name, value in pyro.get_param_store().named_parameters()
            if name.startswith(guide._pyro_name)]


def exact_posterior(x, dictionary, prior_scale, noise_var, nodes=96, width=12.0):
    """log p(x) and the posterior mean and covariance of z, by numerical integration (H = 1 or 2).

    The integrand p(z) p(x|z) is smooth inside each orthant of z (the Laplace
    prior has its kinks on the axes), so each orthant is integrated separately
    with a Gauss-Legendre product rule. Inside orthant s the integrand is
    proportional to a Gaussian in z with covariance C = sigma^2 (W^T W)^-1 and
    mean C (W^T x / sigma^2 - s / lambda); the box mean +- ``width`` standard
    deviations, clipped to the orthant, holds all of its mass.

    :param x: one data point, shape (D,). The other arguments are W (D, H), lambda (H,), sigma^2.
    :returns: ``(log_px, mean (H,), covariance (H, H))`` as float64 numpy values.
    """
    import itertools

    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(dictionary, dtype=np.float64)
    lam = np.asarray(prior_scale, dtype=np.float64)
    var = float(noise_var)
    hidden = w.shape[1]
    if hidden not in (1, 2):
        raise ValueError("exact_posterior integrates H = 1 or 2 only")
    gauss_nodes, gauss_weights = np.polynomial.legendre.leggauss(nodes)
    covariance = var * np.linalg.inv(w.T @ w)
    sd = np.sqrt(np.diag(covariance))

    def log_joint(z):  # z (..., H)
        log_prior = -(np.abs(z) / lam).sum(-1) - np.log(2 * lam).sum()
        residual = x - z @ w.T
        return log_prior - 0.5 * (len(x) * np.log(2 * np.pi * var) + (residual ** 2).sum(-1) / var)

    pieces = []  # (log of integral of exp(log_joint - shift), first moments, second moments)
    for signs in itertools.product((-1.0, 1.0), repeat=hidden):
        signs = np.array(signs)
        centre = covariance @ (w.T @ x / var - signs / lam)
        low = np.maximum(signs * centre - width * sd, 0.0)  # in |z| coordinates
        high = signs * centre + width * sd
        if np.any(high <= low):
            continue
        axes = [(low[h] + high[h]) / 2 + (high[h] - low[h]) / 2 * gauss_nodes for h in range(hidden)]
        weights = [(high[h] - low[h]) / 2 * gauss_weights for h in range(hidden)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1) * signs
        weight = np.prod(np.stack(np.meshgrid(*weights, indexing="ij"), -1), -1)
        pieces.append((grid.reshape(-1, hidden), weight.reshape(-1), log_joint(grid).reshape(-1)))
    shift = max(piece[2].max() for piece in pieces)
    total = sum((wt * np.exp(lj - shift)).sum() for _, wt, lj in pieces)
    first = sum(((wt * np.exp(lj - shift))[:, None] * z).sum(0) for z, wt, lj in pieces) / total
    second = sum(np.einsum("k,ki,kj->ij", wt * np.exp(lj - shift), z, z) for z, wt, lj in pieces) / total
    return shift + np.log(total), first, second - np.outer(first, first)


def per_point_elbo(model, guide, x):
    """The closed-form ELBO of each data point, F_n (shape (N,)), for a per-point Gaussian guide.

        F_n = H[q_n] - D/2 log(2 pi sigma^2) - E||x_n - W z||^2 / (2 sigma^2)
              - sum_h [log(2 lambda_h) + E|z_h| / lambda_h]

    The entropy comes from torch's own distribution (not from pyro_esc.gaussian).
    """
    import math

    from pyro_esc.gaussian import folded_normal_mean
    from pyro_esc.posterior import gaussian_posterior

    with torch.no_grad():
        posterior = gaussian_posterior(guide, x)
        dictionary = model.dictionary
        prior_scale, noise_var = model.prior_scale, model.noise_var
        entropy = posterior.per_point_distribution().entropy()
        sq_error = (x - posterior.mean @ dictionary.T).square().sum(-1) + posterior.trace_terms(dictionary)
        abs_mean = folded_normal_mean(posterior.mean, posterior.stddev)
        return (entropy - 0.5 * x.size(1) * (math.log(2 * math.pi) + noise_var.log()) - sq_error / (2 * noise_var)
                - (torch.log(2 * prior_scale) + abs_mean / prior_scale).sum(-1))


def fixed_gaussian_guide(loc, scale_tril=None, scale=None):
    """A per-point Gaussian user guide whose parameters start at the given values.

    ``scale_tril`` (N, H, H) gives a MultivariateNormal "z" site, ``scale`` (N, H)
    a diagonal Normal one; the protocol recognises both automatically.
    """
    import pyro.distributions as dist
    from pyro.distributions import constraints

    def guide(x, subsample=None):
        mean = pyro.param("guide_loc", lambda: loc.clone())
        with pyro.plate("data", x.size(0), subsample=subsample) as index:
            if scale_tril is not None:
                tril = pyro.param("guide_tril", lambda: scale_tril.clone(), constraint=constraints.lower_cholesky)
                pyro.sample("z", dist.MultivariateNormal(mean[index], scale_tril=tril[index]))
            else:
                sd = pyro.param("guide_scale", lambda: scale.clone(), constraint=constraints.positive)
                pyro.sample("z", dist.Normal(mean[index], sd[index]).to_event(1))

    return guide


def fit_guide_only(model, guide, x, steps, lr):
    """Optimise the guide's "guide_*" params (the model's stay fixed) on the closed-form ELBO.

    The guide's params must exist (run the guide once before).
    """
    from pyro_esc import AnalyticELBO

    params = [value for name, value in pyro.get_param_store().named_parameters() if name.startswith("guide_")]
    assert params, "run the guide once first: it has no params yet"
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        AnalyticELBO().differentiable_loss(model, guide, x).backward()
        optimizer.step()
    return guide


def assert_analytic_elbo_matches_trace_elbo(model, guide, x, scales, num_particles=3000):
    """AnalyticELBO within 4 standard errors of Pyro's Trace_ELBO, at Theorem 2's scales
    (``scales="optimal"``) or at arbitrary ones."""
    from pyro_esc import AnalyticELBO, EntropyELBO

    if scales == "optimal":
        EntropyELBO().loss(model, guide, x)
    else:
        model.set_scales(prior_scale=torch.linspace(0.3, 2.0, model.n_latents), noise_var=0.7)
    analytic = AnalyticELBO().loss(model, guide, x)
    trace_elbo, standard_error, _ = monte_carlo_check(model, guide, x, num_particles=num_particles)
    assert abs(analytic - trace_elbo) < 4 * standard_error, (analytic, trace_elbo, standard_error)


def assert_same_posterior(first, second, dictionary):
    """Two GaussianPosterior summaries agree: means, variances, entropy and the trace terms
    (per point where the covariances are per point, summed for joint posteriors)."""
    assert torch.allclose(first.mean, second.mean)
    assert torch.allclose(first.variance, second.variance)
    assert torch.allclose(first.entropy, second.entropy)
    assert first.is_joint == second.is_joint
    assert torch.allclose(first.trace_term(dictionary), second.trace_term(dictionary))
    if not first.is_joint:
        assert torch.allclose(first.trace_terms(dictionary), second.trace_terms(dictionary))


@functools.lru_cache(maxsize=None)
def readme_prior_module():
    """The user guide's "Adding a prior" block (docs/guide/extending.md), executed as written (once: it registers
    its prior); its namespace."""
    section = EXTENDING.read_text().split("## Adding a prior", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/guide/extending.md: Adding a prior", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


# ------------------------------------------------------------ the guide registry


def readme_guide_class():
    """The guide class of the user guide's "Adding a Gaussian guide" section (docs/guide/extending.md), as written."""
    section = EXTENDING.read_text().split("## Adding a Gaussian guide", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/guide/extending.md", "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["LowRankNormal"]


class TracedLowRank(torch.nn.Module):
    """The user guide's guide without its protocol method: EntropyELBO must recognise it by tracing."""

    def __init__(self, num_data, n_latents, rank=2):
        super().__init__()
        self.inner = readme_guide_class()(num_data, n_latents, rank)
        self._pyro_name = self.inner._pyro_name  # for guide_parameters / randomize_guide

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _amortized(**kwargs):
    from pyro_esc import AmortizedNormal

    return lambda model, x: AmortizedNormal(x.size(1), model.n_latents, **kwargs)


def _local(model, x):
    from pyro_esc import LocalMultivariateNormal

    return LocalMultivariateNormal(model)


#: Every guide the tests run by name: name -> factory(model, x), x the data it will see.
GUIDES = {
    # Pyro's autoguides
    "AutoNormal": lambda model, x: AutoNormal(model),
    "AutoDiagonalNormal": lambda model, x: AutoDiagonalNormal(model),
    "AutoMultivariateNormal": lambda model, x: AutoMultivariateNormal(model),
    "AutoLowRankMultivariateNormal": lambda model, x: AutoLowRankMultivariateNormal(model, rank=3),
    # pyro_esc's own guides
    "LocalMultivariateNormal": _local,
    "AmortizedNormal-diag": _amortized(hidden=(8, 7)),
    "AmortizedNormal-full": _amortized(hidden=(8,), covariance="full", skip=True),
    "AmortizedNormal-lowrank": _amortized(hidden=(8, 7), covariance="lowrank", rank=2, activation="relu6", skip=True),
    "AmortizedNormal-residual": _amortized(hidden=(), blocks=2, covariance="full", activation="tanh"),
    # a user's guide as the user guide writes it (docs/guide/extending.md), with its protocol method and without (traced)
    "README-LowRankNormal": lambda model, x: readme_guide_class()(x.size(0), model.n_latents),
    "README-LowRankNormal-traced": lambda model, x: TracedLowRank(x.size(0), model.n_latents),
}

#: Pyro's autoguides (read through the registered fast adapters).
AUTOGUIDES = ("AutoNormal", "AutoDiagonalNormal", "AutoMultivariateNormal", "AutoLowRankMultivariateNormal")
#: Everything but the autoguides: pyro_esc's guides and the user guide's example guide (with and without protocol).
PACKAGE_GUIDES = ("LocalMultivariateNormal", "AmortizedNormal-diag", "AmortizedNormal-full", "AmortizedNormal-lowrank",
                  "AmortizedNormal-residual", "README-LowRankNormal",
                  "README-LowRankNormal-traced")
#: The PACKAGE_GUIDES that state their own summary (a gaussian_posterior method): all but the traced one.
PROTOCOL_GUIDES = ("LocalMultivariateNormal", "AmortizedNormal-diag", "AmortizedNormal-full", "AmortizedNormal-lowrank",
                   "AmortizedNormal-residual", "README-LowRankNormal")
#: The PROTOCOL_GUIDES with correlated posteriors (full or low-rank covariance).
CORRELATED_GUIDES = ("LocalMultivariateNormal", "AmortizedNormal-full", "AmortizedNormal-lowrank",
                     "AmortizedNormal-residual", "README-LowRankNormal")
#: pyro_esc's full-covariance guides, one local and one amortised.
FULL_COVARIANCE_GUIDES = ("LocalMultivariateNormal", "AmortizedNormal-full")

assert set(AUTOGUIDES) | set(PACKAGE_GUIDES) == set(GUIDES) and not set(AUTOGUIDES) & set(PACKAGE_GUIDES)
assert set(FULL_COVARIANCE_GUIDES) <= set(CORRELATED_GUIDES) <= set(PROTOCOL_GUIDES) <= set(PACKAGE_GUIDES)


def guide_problem(guide_name, num=30, side=3, seed=3, dtype=None, prior="laplace"):
    """``(model, guide, x)``: ``num`` side x side bars (``seed``), a SparseCoding model with
    2 * side latents (and ``prior``), and the named guide of :data:`GUIDES` set up on x, at random parameters.

    :param dtype: of the data; ``None`` is the default dtype (float64 under the ``float64`` fixture).
    """
    from pyro_esc import SparseCoding
    from pyro_esc.data import bars

    x, _ = bars(num, side=side, seed=seed, dtype=torch.get_default_dtype() if dtype is None else dtype)
    model = SparseCoding(x.size(1), 2 * side, prior=prior)
    guide = GUIDES[guide_name](model, x)
    randomize_guide(guide, x)
    return model, guide, x


def one_point_optimum(model, x_point, full):
    """The best Gaussian q for one point under the fixed model: torch L-BFGS, ELBO from torch distributions."""
    h = model.n_latents
    w, lam, s2 = model.dictionary.detach(), model.prior_scale.detach(), model.noise_var.detach()
    loc = torch.zeros(h, dtype=torch.float64, requires_grad=True)
    raw = torch.full((h,), math.log(0.1), dtype=torch.float64, requires_grad=True)
    off = torch.zeros(h, h, dtype=torch.float64, requires_grad=True)
    params = [loc, raw] + ([off] if full else [])

    def negative_elbo():
        tril = torch.diag(raw.exp()) + (off.tril(-1) if full else 0)
        q = dist.MultivariateNormal(loc, scale_tril=tril)
        cov = tril @ tril.T
        sd = cov.diagonal().sqrt()
        abs_mean = sd * math.sqrt(2 / math.pi) * torch.exp(-loc ** 2 / (2 * sd ** 2)) + loc * torch.erf(
            loc / (math.sqrt(2) * sd))
        sq = (x_point - w @ loc).square().sum() + torch.trace(w @ cov @ w.T)
        elbo = (q.entropy() - 0.5 * x_point.numel() * torch.log(2 * math.pi * s2) - sq / (2 * s2)
                - (torch.log(2 * lam) + abs_mean / lam).sum())
        return -elbo

    optimizer = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = negative_elbo()
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        return loc.detach(), -float(negative_elbo())


#: A decimal number as prose writes one ("0.035", not "v1.9" or "1.2.3"): what the drift tests look for.
DECIMAL_NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")


def commit_in_history(commit):
    """Whether ``commit`` is an ancestor of HEAD; skips the calling test outside a git checkout with its
    whole history (no git, an exported tree, a shallow clone), where an unknown commit proves nothing."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True)

    try:
        shallow = git("rev-parse", "--is-shallow-repository")
    except OSError:
        pytest.skip("git is not installed")
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("not a git checkout with its whole history")
    return git("merge-base", "--is-ancestor", commit, "HEAD").returncode == 0
