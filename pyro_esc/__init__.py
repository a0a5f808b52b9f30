"""pyro_esc: probabilistic sparse coding in Pyro, learned with the entropy-based ELBO.

Implements "Learning Sparse Codes with Entropy-Based ELBOs" (Velychko, Damm,
Fischer, Lücke; AISTATS 2024) on top of Pyro and PyTorch.
"""

from .apps.denoising import denoise
from .apps.encoding import encode
from .apps.warm_start import fit_amortized
from .distributions import kl  # noqa: F401 - registers the closed-form KL(Gaussian || Laplace) with torch
from .evaluate.elbo import held_out_elbo, reference_elbo, training_elbo
from .evaluate.likelihood import LogLikelihood, log_likelihood
from .infer.objectives import AnalyticELBO, EntropyELBO, NonFiniteObjectiveError
from .infer.solver import SolvedPosteriors, solve_posteriors
from .models.sparse_coding import SparseCoding
from .saving import load, save
from .train.em import EM
from .train.history import History
from .train.loop import fit
from .variational.guides import AmortizedNormal, LocalMultivariateNormal
from .variational.posterior import GaussianPosterior, gaussian_posterior
from .variational.semi_amortized import SemiAmortized

__version__ = "0.1.0"


def __getattr__(name):
    # The scikit-learn estimator on first use: importing scikit-learn costs a second that `import pyro_esc`
    # should not (PEP 562).
    if name == "SparseCodingEstimator":
        from .apps.sklearn import SparseCodingEstimator

        return SparseCodingEstimator
    raise AttributeError(f"module 'pyro_esc' has no attribute {name!r}")


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
    "SparseCodingEstimator",
    "denoise",
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
