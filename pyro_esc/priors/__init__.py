"""Priors over the latents: the seam through which the model, the objectives and the solver see p(z).

- :class:`Prior`: the base class a new prior subclasses (one file; docs/guide/extending.md, "Adding a prior");
- :class:`Laplace`: sparse coding (the default);
- :class:`Gaussian`: probabilistic PCA;
- :func:`get_prior`: a prior from its name, as files and the command line give it.
"""

from .base import Prior, get_prior, registered_priors
from .gaussian import Gaussian
from .laplace import Laplace

__all__ = ["Gaussian", "Laplace", "Prior", "get_prior", "registered_priors"]
