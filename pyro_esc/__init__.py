"""pyro_esc: probabilistic sparse coding in Pyro, learned with the entropy-based ELBO.

Implements "Learning Sparse Codes with Entropy-Based ELBOs" (Velychko, Damm,
Fischer, Lücke; AISTATS 2024) on top of Pyro and PyTorch.
"""

from .model import SparseCoding
from .objectives import AnalyticELBO, EntropyELBO, NonFiniteObjectiveError
from .posterior import GaussianPosterior, gaussian_posterior

__version__ = "0.1.0"

__all__ = [
    "AnalyticELBO",
    "EntropyELBO",
    "GaussianPosterior",
    "NonFiniteObjectiveError",
    "SparseCoding",
    "gaussian_posterior",
]
