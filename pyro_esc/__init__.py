"""pyro_esc: probabilistic sparse coding in Pyro, learned with the entropy-based ELBO.

Implements "Learning Sparse Codes with Entropy-Based ELBOs" (Velychko, Damm,
Fischer, Lücke; AISTATS 2024) on top of Pyro and PyTorch.
"""

from . import kl  # noqa: F401 - registers the closed-form KL(Gaussian || Laplace) with torch
from .em import EM
from .encoding import encode
from .evaluation import held_out_elbo, reference_elbo, training_elbo
from .guides import AmortizedNormal, LocalMultivariateNormal
from .likelihood import LogLikelihood, log_likelihood
from .model import SparseCoding
from .objectives import AnalyticELBO, EntropyELBO, NonFiniteObjectiveError
from .posterior import GaussianPosterior, gaussian_posterior
from .refinement import SemiAmortized
from .saving import load, save
from .solver import SolvedPosteriors, solve_posteriors
from .history import History
from .training import fit
from .warm_start import fit_amortized

__version__ = "0.1.0"

__all__ = [
    "AmortizedNormal",
    "AnalyticELBO",
    "EM",
    "EntropyELBO",
    "GaussianPosterior",
    "History",
    "LocalMultivariateNormal",
    "LogLikelihood",
    "NonFiniteObjectiveError",
    "SemiAmortized",
    "SolvedPosteriors",
    "SparseCoding",
    "encode",
    "fit",
    "fit_amortized",
    "gaussian_posterior",
    "held_out_elbo",
    "log_likelihood",
    "load",
    "reference_elbo",
    "save",
    "solve_posteriors",
    "training_elbo",
]
