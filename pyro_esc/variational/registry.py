"""The guides by name: the one registry that the command line, the experiments, the scikit-learn
estimator, :func:`~pyro_esc.reference_elbo` and :func:`~pyro_esc.save` ask.

- ``local-full``: :class:`~pyro_esc.LocalMultivariateNormal`, one full-covariance Gaussian per point
  (family ``full``);
- ``local-diag``: Pyro's ``AutoNormal``, sharing the model's plate (family ``diag``);
- ``amortized-full``, ``amortized-diag``, ``amortized-lowrank``: :class:`~pyro_esc.AmortizedNormal`, an
  encoder with a full, diagonal or low-rank-plus-diagonal covariance;
- ``joint-full``: Pyro's ``AutoMultivariateNormal``, one Gaussian over all points' latents.

The family is what :func:`~pyro_esc.variational.guides.covariance_family` says of the built guide:
the per-point solver and the EM route handle those two.

Example::

    >>> from pyro_esc import SparseCoding
    >>> from pyro_esc.variational.registry import guide_name, make_guide
    >>> guide = make_guide("amortized-full", SparseCoding(16, 8), hidden=(32,))
    >>> type(guide).__name__, guide_name(guide)
    ('AmortizedNormal', 'amortized-full')
"""

from typing import Callable, NamedTuple

from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from .guides import AmortizedNormal, LocalMultivariateNormal, covariance_family

__all__ = ["GUIDES", "GuideKind", "guide_name", "make_guide"]


class GuideKind(NamedTuple):
    """A registered guide: its name, a one-line label, and how to build it for a model."""

    name: str
    label: str
    build: Callable  #: ``build(model, **options)`` -> a guide
    amortized: bool  #: an encoder q(z | x) that serves new data (the others hold per-point posteriors)


def _amortized(covariance):
    def build(model, hidden=(100,), **options):
        return AmortizedNormal(model.data_dim, model.n_latents, hidden=tuple(hidden), covariance=covariance,
                               **options)

    return build


#: Every guide by name, in the order the command line lists them.
GUIDES = {kind.name: kind for kind in (
    GuideKind("local-full", "full covariance (LocalMultivariateNormal)",
              lambda model: LocalMultivariateNormal(model), False),
    GuideKind("local-diag", "diagonal (AutoNormal)",
              lambda model: AutoNormal(model, create_plates=model.create_plates), False),
    GuideKind("amortized-full", "amortised, full covariance (AmortizedNormal)", _amortized("full"), True),
    GuideKind("amortized-diag", "amortised, diagonal (AmortizedNormal)", _amortized("diag"), True),
    GuideKind("amortized-lowrank", "amortised, low-rank plus diagonal (AmortizedNormal)", _amortized("lowrank"),
              True),
    GuideKind("joint-full", "joint full covariance (AutoMultivariateNormal)",
              lambda model: AutoMultivariateNormal(model), False),
)}


def make_guide(name, model, **options):
    """The guide registered as ``name``, built for ``model``; ``options`` go to its builder
    (``hidden``, ``activation``, ... for the amortised ones).

    :raises ValueError: for an unknown name (naming the known ones), or options a guide does not take.
    """
    kind = GUIDES.get(name)
    if kind is None:
        raise ValueError(f"guide must be one of {tuple(GUIDES)}, got {name!r}")
    if options and not kind.amortized:
        raise ValueError(f"{sorted(options)} set an amortised guide's encoder; guide {name!r} has none")
    return kind.build(model, **options)


def guide_name(guide):
    """The registered name of a guide object (the kind :func:`make_guide` would build), or None."""
    if isinstance(guide, AmortizedNormal):
        return f"amortized-{guide.covariance}"
    family = covariance_family(guide)
    if family is not None:
        return "local-full" if family == "full" else "local-diag"
    if type(guide) is AutoMultivariateNormal:
        return "joint-full"
    return None
