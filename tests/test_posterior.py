"""The guide protocol: fast adapters, automatic recognition, user guides."""

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints

from helpers import assert_same_posterior, monte_carlo_check
from pyro_esc import AnalyticELBO, EntropyELBO, GaussianPosterior, SparseCoding, gaussian_posterior
from pyro_esc.data import bars
from pyro_esc.posterior import posterior_from_trace
from test_objectives import GUIDES, setup

HIDDEN = 6


@pytest.mark.parametrize("guide_name", GUIDES)
def test_fast_adapters_match_automatic_recognition(float64, guide_name):
    # Two routes to the same summary: reading parameters vs tracing the guide's sample sites.
    model, guide, x = setup(guide_name)
    dictionary = torch.randn(x.size(1), HIDDEN)
    assert_same_posterior(gaussian_posterior(guide, x), posterior_from_trace(guide, x), dictionary)


def normal_guide(x, subsample=None):
    loc = pyro.param("loc", lambda: 0.3 * torch.randn(x.size(0), HIDDEN))
    scale = pyro.param("scale", lambda: torch.rand(x.size(0), HIDDEN) + 0.1, constraint=constraints.positive)
    with pyro.plate("data", x.size(0), subsample=subsample) as index:
        pyro.sample("z", dist.Normal(loc[index], scale[index]).to_event(1))


def mvn_guide(x, subsample=None):
    loc = pyro.param("loc", lambda: 0.3 * torch.randn(x.size(0), HIDDEN))
    tril = pyro.param("tril", lambda: torch.eye(HIDDEN) * 0.3 + 0.1 * torch.randn(x.size(0), HIDDEN, HIDDEN).tril(),
                      constraint=constraints.lower_cholesky)
    with pyro.plate("data", x.size(0), subsample=subsample) as index:
        pyro.sample("z", dist.MultivariateNormal(loc[index], scale_tril=tril[index]))


class ProtocolGuide:
    """A guide that states its own summary (the protocol method)."""

    def __call__(self, x, subsample=None):
        loc, scale = self.params(x)
        with pyro.plate("data", x.size(0), subsample=subsample) as index:
            # Recognition could read this site too; the call count shows the method is used.
            pyro.sample("z", dist.Normal(loc[index], scale[index]).to_event(1))

    def params(self, x):
        loc = pyro.param("loc", lambda: 0.3 * torch.randn(x.size(0), HIDDEN))
        scale = pyro.param("scale", lambda: torch.rand(x.size(0), HIDDEN) + 0.1, constraint=constraints.positive)
        return loc, scale

    def gaussian_posterior(self, x, subsample=None):
        self.calls = getattr(self, "calls", 0) + 1
        loc, scale = self.params(x)
        if subsample is not None:
            loc, scale = loc[subsample], scale[subsample]
        return GaussianPosterior.from_scale(loc, scale)


@pytest.mark.parametrize("guide", [normal_guide, mvn_guide, ProtocolGuide()], ids=["normal", "mvn", "protocol"])
def test_user_guides_work_with_the_closed_form_objectives(float64, guide):
    x, _ = bars(30, side=3, seed=3, dtype=torch.float64)
    model = SparseCoding(x.size(1), HIDDEN)
    entropy = EntropyELBO().loss(model, guide, x)
    analytic = AnalyticELBO().loss(model, guide, x)
    assert abs(entropy - analytic) < 1e-8 * abs(analytic)
    trace_elbo, standard_error, _ = monte_carlo_check(model, guide, x, num_particles=3000)
    assert abs(analytic - trace_elbo) < 4 * standard_error
    if isinstance(guide, ProtocolGuide):
        assert guide.calls == 2  # the method was used, not recognition


def test_registered_adapter_takes_precedence(float64):
    class Registered(ProtocolGuide):
        pass

    seen = []

    @gaussian_posterior.register(Registered)
    def _(guide, x, subsample=None):
        seen.append(True)
        return ProtocolGuide.gaussian_posterior(guide, x, subsample)

    x, _ = bars(10, side=3, dtype=torch.float64)
    model = SparseCoding(9, HIDDEN)
    EntropyELBO().loss(model, Registered(), x)
    assert seen


def test_constructors_agree_with_each_other(float64):
    torch.manual_seed(0)
    mean = torch.randn(4, HIDDEN)
    factor, diag = torch.randn(4, HIDDEN, 2), torch.rand(4, HIDDEN) + 0.1
    covariance = factor @ factor.transpose(-1, -2) + torch.diag_embed(diag)
    dictionary = torch.randn(9, HIDDEN)
    low_rank = GaussianPosterior.from_low_rank(mean, factor, diag)
    full = GaussianPosterior.from_covariance(mean, covariance)
    assert_same_posterior(low_rank, full, dictionary)
    assert torch.allclose(low_rank.trace_terms(dictionary), full.trace_terms(dictionary))
    # Trace term: tr(W T W^T) written out.
    assert torch.allclose(full.trace_terms(dictionary),
                          torch.einsum("dh,nhk,dk->n", dictionary, covariance, dictionary))
    scale = torch.rand(4, HIDDEN) + 0.1
    diagonal = GaussianPosterior.from_scale(mean, scale)
    assert_same_posterior(diagonal, GaussianPosterior.from_covariance(mean, torch.diag_embed(scale ** 2)), dictionary)
    joint = GaussianPosterior.from_joint(mean, full.variance, covariance.sum(0), full.entropy)
    assert torch.allclose(joint.trace_term(dictionary), full.trace_term(dictionary))
    with pytest.raises(ValueError, match="per-point"):
        joint.trace_terms(dictionary)


@pytest.mark.parametrize("call, message", [
    (lambda m: GaussianPosterior.from_scale(m[0], 1.0), r"mean must be a tensor of shape \(B, H\)"),
    (lambda m: GaussianPosterior.from_scale(m, torch.ones(3)), "scale must have shape"),
    (lambda m: GaussianPosterior.from_scale_tril(m, torch.ones(4, 6, 5)), "scale_tril must have shape"),
    (lambda m: GaussianPosterior.from_covariance(m, -torch.eye(6).expand(4, 6, 6)), "positive definite"),
    (lambda m: GaussianPosterior.from_low_rank(m, torch.ones(4, 6), torch.ones(4, 6)), "cov_factor"),
    (lambda m: GaussianPosterior.from_joint(m, torch.ones(4, 6), torch.eye(5), torch.tensor(0.0)), "covariance_sum"),
])
def test_constructors_validate_shapes(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(4, 6))


def test_joint_guides_refuse_subsampling():
    model, guide, x = setup("AutoMultivariateNormal")
    with pytest.raises(ValueError, match="cannot be subsampled"):
        EntropyELBO().loss(model, guide, x, subsample=torch.arange(5))
