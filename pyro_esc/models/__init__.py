"""Models: :class:`~pyro_esc.models.sparse_coding.SparseCoding`, a prior over latents (:mod:`pyro_esc.priors`)
and Gaussian noise, as a Pyro model."""

from .sparse_coding import MODEL_PARAMETERS, SparseCoding

__all__ = ["MODEL_PARAMETERS", "SparseCoding"]
