"""Independent routes that the tests compare the closed-form code against."""

import torch

import pyro
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import prune_subsample_sites


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
            value.add_(scale * noise)


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
