"""The guide protocol: fast adapters, automatic recognition, user guides."""

import pytest
import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam

from helpers import AUTOGUIDES, assert_same_posterior, guide_problem, monte_carlo_check
from pyro_esc import AnalyticELBO, EntropyELBO, GaussianPosterior, SparseCoding, gaussian_posterior
from pyro_esc.data import bars
from pyro_esc.posterior import (
    DiagonalGaussianPosterior,
    FullGaussianPosterior,
    JointGaussianPosterior,
    LowRankGaussianPosterior,
    posterior_from_trace,
)

N_LATENTS = 6


@pytest.mark.parametrize("guide_name", AUTOGUIDES)
def test_fast_adapters_match_automatic_recognition(float64, guide_name):
    # Two routes to the same summary: reading parameters vs tracing the guide's sample sites.
    model, guide, x = guide_problem(guide_name)
    dictionary = torch.randn(x.size(1), N_LATENTS)
    assert_same_posterior(gaussian_posterior(guide, x), posterior_from_trace(guide, x), dictionary)


def normal_guide(x, subsample=None):
    loc = pyro.param("loc", lambda: 0.3 * torch.randn(x.size(0), N_LATENTS))
    scale = pyro.param("scale", lambda: torch.rand(x.size(0), N_LATENTS) + 0.1, constraint=constraints.positive)
    with pyro.plate("data", x.size(0), subsample=subsample) as index:
        pyro.sample("z", dist.Normal(loc[index], scale[index]).to_event(1))


def mvn_guide(x, subsample=None):
    loc = pyro.param("loc", lambda: 0.3 * torch.randn(x.size(0), N_LATENTS))
    tril = pyro.param("tril", lambda: torch.eye(N_LATENTS) * 0.3 + 0.1 * torch.randn(x.size(0), N_LATENTS, N_LATENTS).tril(),
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
        loc = pyro.param("loc", lambda: 0.3 * torch.randn(x.size(0), N_LATENTS))
        scale = pyro.param("scale", lambda: torch.rand(x.size(0), N_LATENTS) + 0.1, constraint=constraints.positive)
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
    model = SparseCoding(x.size(1), N_LATENTS)
    entropy = EntropyELBO().loss(model, guide, x)
    EntropyELBO().update(model, guide, x)  # Theorem 2's scales into the model
    analytic = AnalyticELBO().loss(model, guide, x)
    assert abs(entropy - analytic) < 1e-8 * abs(analytic)
    trace_elbo, standard_error, _ = monte_carlo_check(model, guide, x, num_particles=3000)
    assert abs(analytic - trace_elbo) < 4 * standard_error
    if isinstance(guide, ProtocolGuide):
        assert guide.calls == 3  # the method was used (loss, update, analytic), not recognition


def test_registered_adapter_takes_precedence(float64):
    class Registered(ProtocolGuide):
        pass

    seen = []

    @gaussian_posterior.register(Registered)
    def _(guide, x, subsample=None):
        seen.append(True)
        return ProtocolGuide.gaussian_posterior(guide, x, subsample)

    x, _ = bars(10, side=3, dtype=torch.float64)
    model = SparseCoding(9, N_LATENTS)
    EntropyELBO().loss(model, Registered(), x)
    assert seen


def test_constructors_agree_with_each_other(float64):
    torch.manual_seed(0)
    mean = torch.randn(4, N_LATENTS)
    factor, diag = torch.randn(4, N_LATENTS, 2), torch.rand(4, N_LATENTS) + 0.1
    covariance = factor @ factor.transpose(-1, -2) + torch.diag_embed(diag)
    dictionary = torch.randn(9, N_LATENTS)
    low_rank = GaussianPosterior.from_low_rank(mean, factor, diag)
    full = GaussianPosterior.from_covariance(mean, covariance)
    assert_same_posterior(low_rank, full, dictionary)
    assert torch.allclose(low_rank.trace_terms(dictionary), full.trace_terms(dictionary))
    # Trace term: tr(W T W^T) written out.
    assert torch.allclose(full.trace_terms(dictionary),
                          torch.einsum("dh,nhk,dk->n", dictionary, covariance, dictionary))
    scale = torch.rand(4, N_LATENTS) + 0.1
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
    model, guide, x = guide_problem("AutoMultivariateNormal", dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot be subsampled"):
        EntropyELBO().loss(model, guide, x, subsample=torch.arange(5))


# ------------------------------------------------------------ one class per family


def random_families(num=4):
    """The four families on the same random means, with covariances known independently (written out)."""
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(num, N_LATENTS, generator=generator)
    scale = torch.rand(num, N_LATENTS, generator=generator) + 0.1
    tril = torch.randn(num, N_LATENTS, N_LATENTS, generator=generator).tril(-1) + torch.diag_embed(scale)
    factor, diag = torch.randn(num, N_LATENTS, 2, generator=generator), scale.square()
    return mean, {
        "diagonal": (GaussianPosterior.from_scale(mean, scale), torch.diag_embed(scale.square())),
        "full": (GaussianPosterior.from_scale_tril(mean, tril), tril @ tril.transpose(-1, -2)),
        "low-rank": (GaussianPosterior.from_low_rank(mean, factor, diag),
                     factor @ factor.transpose(-1, -2) + torch.diag_embed(diag)),
    }


def test_constructors_return_one_class_per_family(float64):
    mean, families = random_families()
    expected = {"diagonal": DiagonalGaussianPosterior, "full": FullGaussianPosterior,
                "low-rank": LowRankGaussianPosterior}
    for name, (posterior, covariance) in families.items():
        assert type(posterior) is expected[name] and isinstance(posterior, GaussianPosterior), name
        assert not posterior.is_joint and repr(posterior) == f"GaussianPosterior({name}, num_points=4, latent_dim=6)"
        # Per-family methods against the covariance written out.
        assert torch.allclose(posterior.covariance_matrices(), covariance), name
        assert torch.allclose(posterior.variance, covariance.diagonal(dim1=-2, dim2=-1)), name
        expected_entropies = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).entropy()
        assert torch.allclose(posterior.point_entropies(), expected_entropies), name
        # A subset of the points is the family built on those rows.
        rows = torch.tensor([2, 0])
        subset = posterior.index_select(rows)
        assert type(subset) is type(posterior)
        assert torch.allclose(subset.mean, mean[rows]) and torch.allclose(subset.covariance_matrices(), covariance[rows])
        assert torch.allclose(subset.entropy, expected_entropies[rows].sum())
    covariance = families["full"][1]
    joint = GaussianPosterior.from_covariance(mean, covariance)
    assert type(joint) is FullGaussianPosterior
    joint = GaussianPosterior.from_joint(mean, joint.variance, covariance.sum(0), joint.entropy)
    assert type(joint) is JointGaussianPosterior and joint.is_joint and isinstance(joint, GaussianPosterior)
    for method in ("point_entropies", "per_point_distribution", "covariance_matrices"):
        with pytest.raises(ValueError, match="joint"):
            getattr(joint, method)()
    with pytest.raises(ValueError, match="joint"):
        joint.index_select(torch.tensor([0]))
    with pytest.raises(TypeError):
        GaussianPosterior(mean, mean.square(), torch.tensor(0.0))  # abstract: use a constructor


# ------------------------------------------------------------ no ambiguous broadcast (reported bug)


def test_one_dimensional_scales_are_refused_as_ambiguous(float64):
    # B == H: a 1-D scale (6,) could be one value per point or one per latent; it used to be
    # broadcast silently as per latent.
    mean = torch.randn(N_LATENTS, N_LATENTS)
    values = torch.linspace(0.1, 0.6, N_LATENTS)
    message = r"scale must have shape \(6, 6\).*ambiguous.*\(B, 1\).*per point.*\(1, H\).*per latent"
    with pytest.raises(ValueError, match=message):
        GaussianPosterior.from_scale(mean, values)
    with pytest.raises(ValueError, match=r"cov_diag.*ambiguous.*\(B, 1\)"):
        GaussianPosterior.from_low_rank(mean, torch.randn(N_LATENTS, N_LATENTS, 2), values)
    with pytest.raises(ValueError, match=r"variance.*ambiguous.*\(B, 1\)"):
        GaussianPosterior.from_joint(mean, values, torch.eye(N_LATENTS), torch.tensor(0.0))
    with pytest.raises(ValueError, match="scale must have shape"):
        GaussianPosterior.from_scale(mean, [0.1] * N_LATENTS)  # a list is no different
    # The unambiguous spellings: per point, per latent, a scalar, the full shape.
    per_point = GaussianPosterior.from_scale(mean, values[:, None])
    assert torch.equal(per_point.stddev, values[:, None].expand(N_LATENTS, N_LATENTS))
    per_latent = GaussianPosterior.from_scale(mean, values[None, :])
    assert torch.equal(per_latent.stddev, values[None, :].expand(N_LATENTS, N_LATENTS))
    for scalar in (0.3, torch.tensor(0.3)):
        assert torch.equal(GaussianPosterior.from_scale(mean, scalar).stddev, torch.full_like(mean, 0.3))
    with pytest.raises(ValueError, match="scale must have shape"):
        GaussianPosterior.from_scale(mean, torch.ones(1, N_LATENTS, N_LATENTS))


# ------------------------------------------------------------ user guides are trained, or rejected (reported bug)


class UndecoratedGuide(PyroModule):
    """A PyroModule guide whose gaussian_posterior lacks @pyro_method (the reported bug)."""

    def __init__(self, num_data, n_latents):
        super().__init__(name="UndecoratedGuide")
        self.loc = PyroParam(0.1 * torch.randn(num_data, n_latents), event_dim=1)
        self.scale = PyroParam(torch.full((num_data, n_latents), 0.2), constraints.positive, event_dim=1)

    def forward(self, x, subsample=None, subsample_size=None):
        with pyro.plate("data", x.size(0), subsample=subsample, subsample_size=subsample_size, dim=-1):
            return pyro.sample("z", dist.Normal(self.loc, self.scale).to_event(1))

    def gaussian_posterior(self, x, subsample=None):  # no @pyro_method
        rows = slice(None) if subsample is None else subsample
        return GaussianPosterior.from_scale(self.loc[rows], self.scale[rows])


class PlainModuleGuide(nn.Module):
    """A torch.nn.Module (not a PyroModule) guide; it registers its parameters only if told to."""

    def __init__(self, num_data, n_latents, registers):
        super().__init__()
        self.loc = nn.Parameter(0.1 * torch.randn(num_data, n_latents))
        self.log_scale = nn.Parameter(torch.full((num_data, n_latents), -1.5))
        self.registers = registers

    def _params(self):
        if self.registers:
            pyro.module("plain", self)
        return self.loc, self.log_scale.exp()

    def forward(self, x, subsample=None, subsample_size=None):
        loc, scale = self._params()
        with pyro.plate("data", x.size(0), subsample=subsample, subsample_size=subsample_size, dim=-1) as rows:
            return pyro.sample("z", dist.Normal(loc[rows], scale[rows]).to_event(1))

    def gaussian_posterior(self, x, subsample=None):
        loc, scale = self._params()
        rows = slice(None) if subsample is None else subsample
        return GaussianPosterior.from_scale(loc[rows], scale[rows])


def one_svi_step_moves_every_parameter(guide, x):
    model = SparseCoding(x.size(1), N_LATENTS)
    before = {name: value.detach().clone() for name, value in guide.named_parameters()}
    assert before
    SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), loss=EntropyELBO()).step(x)
    for name, value in guide.named_parameters():
        assert not torch.equal(before[name], value.detach()), f"{name} did not move"


def test_pyro_module_guide_without_pyro_method_is_trained(float64):
    x, _ = bars(20, side=3, seed=0, dtype=torch.float64)
    one_svi_step_moves_every_parameter(UndecoratedGuide(x.size(0), N_LATENTS), x)


def test_plain_module_guide_that_registers_its_parameters_is_trained(float64):
    x, _ = bars(20, side=3, seed=0, dtype=torch.float64)
    one_svi_step_moves_every_parameter(PlainModuleGuide(x.size(0), N_LATENTS, registers=True), x)


def test_plain_module_guide_with_unregistered_parameters_is_rejected(float64):
    x, _ = bars(20, side=3, seed=0, dtype=torch.float64)
    guide = PlainModuleGuide(x.size(0), N_LATENTS, registers=False)
    message = r"PlainModuleGuide.*not a PyroModule.*loc, log_scale.*never train.*PyroModule.*pyro\.module"
    with pytest.raises(ValueError, match=message):
        gaussian_posterior(guide, x)
    with pytest.raises(ValueError, match=message):
        EntropyELBO().loss(SparseCoding(x.size(1), N_LATENTS), guide, x)
    # Frozen parameters need no registration.
    for value in guide.parameters():
        value.requires_grad_(False)
    assert gaussian_posterior(guide, x).num_points == x.size(0)


# ------------------------------------------------------------ AutoNormal subclasses (reported bug)


class ShiftedAutoNormal(AutoNormal):
    """An AutoNormal whose (overridden) reader shifts the means and doubles the scales."""

    def _get_loc_and_scale(self, name):
        loc, scale = super()._get_loc_and_scale(name)
        return loc + 1.0, scale * 2.0


def test_autonormal_subclass_is_read_through_its_own_reader(float64):
    x, _ = bars(20, side=3, seed=0, dtype=torch.float64)
    guide = ShiftedAutoNormal(SparseCoding(x.size(1), N_LATENTS), init_scale=0.2)
    guide(x)
    posterior = gaussian_posterior(guide, x)
    locs, scales = (pyro.param(f"ShiftedAutoNormal.{name}.z").detach() for name in ("locs", "scales"))
    assert torch.allclose(posterior.mean, locs + 1.0)
    assert torch.allclose(posterior.stddev, scales * 2.0)
    # The second route, tracing the guide's sample sites, sees the same distribution.
    assert_same_posterior(posterior, posterior_from_trace(guide, x), torch.randn(x.size(1), N_LATENTS))
    batch = torch.tensor([3, 0, 7])
    assert torch.allclose(gaussian_posterior(guide, x, batch).stddev, scales[batch] * 2.0)


# ------------------------------------------------------------ handlers on a recognised guide


@pytest.mark.parametrize("wrap, message", [
    (lambda guide: poutine.scale(guide, scale=0.5), r"poutine\.scale\(guide, 0\.5\).*cannot honour"),
    (lambda guide: poutine.mask(guide, mask=torch.arange(20) % 2 == 0), r"masked.*poutine\.mask.*cannot honour"),
], ids=["scale", "mask"])
def test_handlers_on_a_recognised_guide_are_refused(float64, wrap, message):
    x, _ = bars(20, side=3, seed=0, dtype=torch.float64)
    normal_guide(x)
    with pytest.raises(ValueError, match=message):
        gaussian_posterior(wrap(normal_guide), x)
    with pytest.raises(ValueError, match=message):
        EntropyELBO().loss(SparseCoding(x.size(1), N_LATENTS), wrap(normal_guide), x)
    # The scale that a subsampling plate implies (N / B) is the guide's own, not a handler's.
    batch = torch.tensor([4, 1, 9, 16])
    assert posterior_from_trace(normal_guide, x, batch).num_points == 4
    with pytest.raises(ValueError, match=message):
        posterior_from_trace(wrap(normal_guide), x, batch)
