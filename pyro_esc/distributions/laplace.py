"""The Laplace distribution of the codes: Pyro's, with a sampler that Pyro's model inspection can trace.

Example::

    >>> import torch
    >>> import pyro.distributions as dist
    >>> from pyro_esc.distributions.laplace import Laplace
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> ours = Laplace(torch.zeros(3), torch.ones(3)).sample((4,))
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> torch.equal(ours, dist.Laplace(torch.zeros(3), torch.ones(3)).sample((4,)))   # the very same draws
    True
"""

import torch

import pyro.distributions as dist

__all__ = ["Laplace"]


class Laplace(dist.Laplace):
    """Pyro's Laplace, drawing its uniforms with ``torch.empty`` where torch's uses ``loc.new(shape)``.

    The same generator calls and the same arithmetic, so the very same draws. But ``loc.new(shape)``
    on the tensors that Pyro's ``render_model`` / ``get_model_relations`` track (``ProvenanceTensor``)
    builds a tensor *from* the shape (two numbers), so inspecting any model with a Laplace site failed.
    """

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        finfo = torch.finfo(self.loc.dtype)
        u = torch.empty(shape, dtype=self.loc.dtype, device=self.loc.device).uniform_(finfo.eps - 1, 1)
        return self.loc - self.scale * u.sign() * torch.log1p(-u.abs())
