"""Optimiser recipes for the SVI route: :func:`decaying_adam` and the bars' tuned version, :func:`bars_optimizer`."""

import pyro

from .._checks import check_int, check_positive
from .._pyro_internals import module_name
from ..variational.guides import AmortizedNormal


def decaying_adam(lr, steps, decay_to=0.2, betas=(0.9, 0.99), clip_norm=10.0, lr_for=None):
    """Pyro's ClippedAdam with the learning rate decaying geometrically to ``lr * decay_to`` over ``steps``.

    The recipe the bars benchmark was tuned with (benchmarks/bars_recovery.py):
    a high initial rate to move away from the initial dictionary fast, decay
    to settle, gradient-norm clipping against the occasional large step, and
    beta_2 = 0.99 so that the second-moment estimate follows the shrinking
    gradients of the posteriors. Pass it to :func:`fit` as ``optim``.

    :param float lr: initial learning rate.
    :param int steps: number of steps over which the rate decays.
    :param callable lr_for: optional ``lr_for(param_name)`` returning a different initial
        rate for some parameters (e.g. an encoder's), or None for ``lr``.
    """
    lr = check_positive(lr, "lr")
    steps = check_int(steps, "steps")
    decay = check_positive(decay_to, "decay_to") ** (1.0 / steps)

    def options(name, _):
        # Called when the optimiser first meets a parameter (after lazy setup).
        rate = lr if lr_for is None or lr_for(name) is None else lr_for(name)
        return {"lr": rate, "lrd": decay, "betas": tuple(betas), "clip_norm": clip_norm}

    return pyro.optim.ClippedAdam(options)


#: Initial learning rate of the encoders of amortised guides (an MLP's output moves by about
#: lr x fan-in per Adam step, so it needs a smaller rate than per-point parameters).
AMORTIZED_LR = 0.003


def bars_optimizer(guide_object, steps, lr=0.2):
    """The tuned bars recipe: :func:`decaying_adam`, encoders at :data:`AMORTIZED_LR`."""
    prefix = module_name(guide_object) + "." if isinstance(guide_object, AmortizedNormal) else None
    return decaying_adam(lr, steps, lr_for=lambda name: AMORTIZED_LR if prefix and name.startswith(prefix) else None)
