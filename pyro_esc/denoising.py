"""Image denoising with a learned sparse code, and a noise level that is learned, never given.

:func:`denoise` cuts every overlapping patch of a grey-scale image, removes each
patch's mean, explains the patches with a :class:`~pyro_esc.SparseCoding`
model, and averages the posterior-mean reconstructions W E_q[z] (plus the
means) back into the image::

    x^(n) = W z^(n) + noise,   z_h ~ Laplace(0, lambda_h),   noise ~ N(0, sigma^2 I)
    x_hat^(n) = W E_q[z^(n)] + mean^(n)

The dictionary W is learned (:func:`learn_dictionary`) from clean patches or
from the noisy image itself, or given as a trained model. Whatever W is,
lambda and sigma^2 are fitted to the noisy patches (Theorem 2's optimum,
:class:`~pyro_esc.EntropyELBO` with the dictionary fixed): sigma^2* is the
noise the model finds in *this* image, so nobody has to tell it the noise
level, unlike the penalty or sparsity of scikit-learn's dictionary learning.
"""

from typing import NamedTuple

import numpy as np
import torch

from pyro.infer.autoguide import AutoNormal

from ._checks import check_int
from ._isolation import isolated
from .encoding import fixed_copy
from .model import SparseCoding

__all__ = ["Denoised", "denoise", "learn_dictionary"]


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


def learn_dictionary(image, patch_size=7, n_latents=100, max_patches=10000, seed=0, **fit_options):
    """Learn a :class:`~pyro_esc.SparseCoding` model of an image's patches (means removed).

    Per-point diagonal posteriors (AutoNormal) on up to ``max_patches`` random patches, trained
    by :func:`~pyro_esc.fit` (L-BFGS to convergence on the full set, by default), in float64 and
    in a param-store scope of its own.

    :param image: grey-scale image (H, W), e.g. the clean half of a photograph, or the noisy image.
    :param fit_options: further arguments of :func:`~pyro_esc.fit` (e.g. ``steps``).
    :returns: the trained model.
    """
    from .training import fit

    image = _image(image)
    size = check_int(patch_size, "patch_size")
    x, _ = _patches(image, size, check_int(max_patches, "max_patches"), seed)
    fit_options.setdefault("progress", False)
    with isolated():
        model = SparseCoding(size * size, check_int(n_latents, "n_latents")).double()
        fit(model, AutoNormal(model, create_plates=model.create_plates), x, seed=seed, **fit_options)
    return model


def denoise(image, patch_size=7, model=None, n_latents=100, max_patches=10000, seed=0, steps=None, **fit_options):
    r"""Denoise a grey-scale image: posterior means of its overlapping patches, averaged.

    :param image: the noisy image (H, W), any range (e.g. [0, 1]).
    :param int patch_size: side of the square patches (default 7).
    :param model: a trained :class:`~pyro_esc.SparseCoding` with ``data_dim = patch_size**2``
        whose dictionary to use (e.g. from :func:`learn_dictionary` on clean data); None: learn
        one from the noisy image itself (``n_latents``, ``max_patches``, ``seed``).
    :param int steps: step limit of each fit (the dictionary's, when learned here, and the posteriors';
        L-BFGS; default: fit's).
    :param fit_options: further arguments of :func:`~pyro_esc.fit` for the posterior fit.
    :returns: :class:`Denoised` ``(image, noise_std, model)``; the model returned is a copy with the
        given dictionary and lambda*, sigma^2* of the noisy patches.
    """
    from sklearn.feature_extraction.image import reconstruct_from_patches_2d

    from .training import fit

    image = _image(image)
    size = check_int(patch_size, "patch_size")
    if model is None:
        model = learn_dictionary(image, size, n_latents, max_patches, seed,
                                 **({} if steps is None else {"steps": steps}))
    elif not isinstance(model, SparseCoding):
        raise ValueError(f"model must be a pyro_esc.SparseCoding or None, got {type(model).__name__}")
    if model.data_dim != size * size:
        raise ValueError(f"model has data_dim {model.data_dim}, but patches of side {size} have {size * size} pixels")
    x, means = _patches(image, size)
    fit_options.setdefault("progress", False)
    fit_options.setdefault("tol", 1e-7)
    with isolated():
        fixed = fixed_copy(model, torch.float64, x.device)
        guide = AutoNormal(fixed, create_plates=fixed.create_plates)
        # lambda and sigma^2 at their optimum for the noisy patches (Theorem 2): the noise is learned.
        fit(fixed, guide, x, train_dictionary=False, seed=seed, steps=steps, **fit_options)
        with torch.no_grad():
            codes = guide.median(x)["z"]
            reconstruction = codes @ fixed.dictionary.T
    patches = (reconstruction.numpy() + means).reshape(-1, size, size)
    denoised = reconstruct_from_patches_2d(patches, image.shape)
    return Denoised(denoised, float(fixed.noise_var.detach().sqrt()), fixed)
