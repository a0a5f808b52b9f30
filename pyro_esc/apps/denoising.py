"""Image denoising with a learned sparse code, and a noise level that is learned, never given.

:func:`denoise` cuts every overlapping patch of a grey-scale image, removes each
patch's mean, explains the patches with a :class:`~pyro_esc.SparseCoding`
model, and averages the posterior-mean reconstructions W E_q[z] (plus the
means) back into the image::

    x^(n) = W z^(n) + noise,   z_h ~ Laplace(0, lambda_h),   noise ~ N(0, sigma^2 I)
    x_hat^(n) = W E_q[z^(n)] + mean^(n)

The dictionary W is learned (:func:`learn_dictionary`) from clean patches or
from the noisy image itself, or given as a trained model. Whatever W is,
lambda and sigma^2 are fitted to the noisy patches (Theorem 2's optimum with
the dictionary fixed): sigma^2* is the noise the model finds in *this* image,
so nobody has to tell it the noise level, unlike the penalty or sparsity of
scikit-learn's dictionary learning. Every posterior is solved at its optimum
(:func:`~pyro_esc.solver.solve_posteriors`), a batch at once.
"""

import contextlib
import functools
import warnings
from typing import NamedTuple

import numpy as np
import torch

from pyro.infer.autoguide import AutoNormal

from .._checks import check_int
from ..infer.solver import solve_posteriors
from ..models.sparse_coding import SparseCoding
from ..train._isolation import isolated
from ..train.convergence import ConvergenceWarning
from ..train.loop import fit
from .encoding import fixed_copy

__all__ = ["DEFAULT_STEPS", "Denoised", "default_latents", "denoise", "learn_dictionary"]

#: The step budget of each fit (EM iterations; each stops earlier on convergence) unless ``steps`` is given.
#: A budget, not convergence: more steps change the PSNR by hundredths of a dB at several times the cost
#: (BENCHMARKS.md, "Against scikit-learn"), so reaching it is not warned about; an explicit ``steps`` is.
DEFAULT_STEPS = 30


@contextlib.contextmanager
def _budget(steps_given):
    """Silence fit's step-limit warning when the limit is :data:`DEFAULT_STEPS`, the chosen budget."""
    with warnings.catch_warnings():
        if not steps_given:
            warnings.filterwarnings("ignore", message="fit: step limit", category=ConvergenceWarning)
        yield


def _warnings_at_caller(function):
    """Show the warnings raised inside ``function`` (fit's) at its caller's line, not inside the library."""

    @functools.wraps(function)
    def shown_at_caller(*args, **kwargs):
        pending = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    return function(*args, **kwargs)
                finally:
                    pending = list(caught)
        finally:
            # Outside the recording context: the caller's filters decide (e.g. "error" raises here).
            for warning in pending:
                warnings.warn(warning.message, warning.category, stacklevel=2)

    return shown_at_caller


def default_latents(patch_size):
    """H = D // 2 for patches of D = ``patch_size ** 2`` pixels.

    With H >= D the dictionary spans every patch, and the ELBO's optimum explains the noise with
    the codes: sigma^2* tends to 0 and the "denoised" image is the noisy one (the EM route gets
    there; an optimiser stopped early may not). Half as many latents as pixels keeps the noise
    in sigma^2 (benchmarks/results/denoising.txt).
    """
    return max(1, patch_size * patch_size // 2)


class Denoised(NamedTuple):
    """What :func:`denoise` returns."""

    image: np.ndarray  #: the denoised image, same shape as the input
    noise_std: float  #: sigma*, the learned noise standard deviation (the image's units; patch means removed)
    model: SparseCoding  #: the model (W, and lambda*, sigma^2* of the noisy patches)


def _image(image, name="image"):
    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a grey-scale image of shape (height, width), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, but contains NaN or inf")
    return array


def _patches(image, size, max_patches=None, seed=0):
    from sklearn.feature_extraction.image import extract_patches_2d

    if size > min(image.shape):
        raise ValueError(f"patch_size {size} is larger than the image {image.shape}")
    patches = extract_patches_2d(image, (size, size), max_patches=max_patches,
                                 random_state=None if max_patches is None else seed)
    patches = patches.reshape(len(patches), -1)
    means = patches.mean(1, keepdims=True)
    return torch.from_numpy(patches - means), means


@_warnings_at_caller
def learn_dictionary(image, patch_size=7, n_latents=None, max_patches=10000, seed=0, **fit_options):
    """Learn a :class:`~pyro_esc.SparseCoding` model of an image's patches (means removed).

    Per-point diagonal posteriors (AutoNormal) on up to ``max_patches`` random patches, trained
    by :func:`~pyro_esc.fit`'s EM route (every patch's posterior solved, the dictionary in closed
    form; by default on the full set, ``steps`` M-steps at most, stopping on convergence), in
    float64 and in a param-store scope of its own.

    Example::

        >>> import numpy as np
        >>> from pyro_esc.denoising import learn_dictionary
        >>> image = np.random.default_rng(0).random((24, 24))
        >>> learn_dictionary(image, patch_size=5, n_latents=8, max_patches=200, steps=5).dictionary.shape
        torch.Size([25, 8])

    :param image: grey-scale image (H, W), e.g. the clean half of a photograph, or the noisy image.
    :param int n_latents: H (default :func:`default_latents`: half the pixels of a patch).
    :param fit_options: further arguments of :func:`~pyro_esc.fit` (e.g. ``steps``, ``optimizer``).
    :returns: the trained model.
    """
    image = _image(image)
    size = check_int(patch_size, "patch_size")
    x, _ = _patches(image, size, check_int(max_patches, "max_patches"), seed)
    fit_options.setdefault("progress", False)
    fit_options.setdefault("optimizer", "em")
    steps_given = fit_options.get("steps") is not None
    if not steps_given:
        fit_options["steps"] = DEFAULT_STEPS
    n_latents = default_latents(size) if n_latents is None else check_int(n_latents, "n_latents")
    with isolated(), _budget(steps_given):
        model = SparseCoding(size * size, n_latents).double()
        fit(model, AutoNormal(model, create_plates=model.create_plates), x, seed=seed, **fit_options)
    return model


@_warnings_at_caller
def denoise(image, patch_size=7, model=None, n_latents=None, max_patches=10000, seed=0, steps=None, **fit_options):
    r"""Denoise a grey-scale image: posterior means of its overlapping patches, averaged.

    1. The dictionary: ``model``'s, or learned from the noisy image itself (:func:`learn_dictionary`
       on ``max_patches`` random patches).
    2. The noise: lambda and sigma^2 fitted to (up to ``max_patches`` random) noisy patches with the
       dictionary fixed (:func:`~pyro_esc.fit`'s EM route: posteriors solved, Theorem 2's scales).
    3. Every overlapping patch's posterior at that model (:func:`~pyro_esc.solver.solve_posteriors`),
       its mean reconstruction W E_q[z] plus the patch mean, averaged into the image.

    Example::

        >>> import numpy as np
        >>> from pyro_esc.denoising import denoise
        >>> noisy = np.random.default_rng(0).random((24, 24))
        >>> result = denoise(noisy, patch_size=5, n_latents=8, max_patches=200, steps=5)
        >>> result.image.shape, result.noise_std > 0
        ((24, 24), True)

    :param image: the noisy image (H, W), any range (e.g. [0, 1]).
    :param int patch_size: side of the square patches (default 7).
    :param model: a trained :class:`~pyro_esc.SparseCoding` with ``data_dim = patch_size**2``
        whose dictionary to use (e.g. from :func:`learn_dictionary` on clean data); None: learn
        one from the noisy image itself (``n_latents``, default :func:`default_latents`;
        ``max_patches``, ``seed``).
    :param int steps: step limit of each fit (the dictionary's, when learned here, and the noise's;
        default :data:`DEFAULT_STEPS`, a budget: reaching it is not warned about, an explicit limit is).
    :param fit_options: further arguments of :func:`~pyro_esc.fit` for the noise's fit.
    :returns: :class:`Denoised` ``(image, noise_std, model)``; the model returned is a copy with the
        given dictionary and lambda*, sigma^2* of the noisy patches.
    """
    from sklearn.feature_extraction.image import reconstruct_from_patches_2d

    image = _image(image)
    size = check_int(patch_size, "patch_size")
    max_patches = check_int(max_patches, "max_patches")
    steps_given = steps is not None
    steps = check_int(steps, "steps") if steps_given else None
    if size > min(image.shape):
        raise ValueError(f"patch_size {size} is larger than the image {image.shape}")
    if model is None:
        if image.max() == image.min():
            raise ValueError("image is constant: its patches hold no structure to learn a dictionary from, and no "
                             "noise to remove; pass a noisy image, or model= a dictionary learned elsewhere")
        model = learn_dictionary(image, size, n_latents, max_patches, seed, steps=steps)
    elif not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding or None, got {type(model).__name__}")
    if model.data_dim != size * size:
        raise ValueError(f"model has data_dim {model.data_dim}, but patches of side {size} have {size * size} pixels")
    x, means = _patches(image, size)
    sample, _ = _patches(image, size, max_patches, seed)
    fit_options.setdefault("progress", False)
    fit_options.setdefault("optimizer", "em")
    with isolated():
        fixed = fixed_copy(model, torch.float64, x.device)
        # lambda and sigma^2 at their optimum for the noisy patches (Theorem 2): the noise is learned.
        with _budget(steps_given):
            fit(fixed, AutoNormal(fixed, create_plates=fixed.create_plates), sample, train_dictionary=False,
                seed=seed, steps=steps if steps_given else DEFAULT_STEPS, **fit_options)
        codes = solve_posteriors(fixed, x, "diag").posterior.mean
        reconstruction = codes @ fixed.dictionary.detach().T
    patches = (reconstruction.numpy() + means).reshape(-1, size, size)
    denoised = reconstruct_from_patches_2d(patches, image.shape)
    return Denoised(denoised, float(fixed.noise_var.detach().sqrt()), fixed)
