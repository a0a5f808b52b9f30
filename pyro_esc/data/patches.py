"""Random square patches cut from grey-scale images, flattened to data points."""

import numbers

import numpy as np
import torch

from .._checks import check_int
from .images import BUNDLED_IMAGES, NATURAL_IMAGES, cached_image

_MEAN_REMOVAL = ("patch", "global", None)


def _image_matrix(image, name):
    """A caller's image as a finite float64 numpy matrix."""
    if isinstance(image, str):
        if image not in BUNDLED_IMAGES:
            raise ValueError(f"{name} names no bundled image: expected one of {sorted(BUNDLED_IMAGES)}, "
                             f"got {image!r}")
        return cached_image(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be a grey-scale image of shape (height, width), got shape {array.shape}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, but contains NaN or inf")
    return array


def _image_list(images):
    if images is None:
        return [cached_image(name) for name in NATURAL_IMAGES]
    if isinstance(images, (str, np.ndarray, torch.Tensor)):
        ndim = 0 if isinstance(images, str) else images.ndim
        # A single image, or an (M, h, w) stack of equally sized ones.
        images = list(images) if ndim == 3 else [images]
    try:
        images = list(images)
    except TypeError:
        raise ValueError("images must be None, an image name, a 2-D array, an (M, h, w) stack or a "
                         f"sequence of names and 2-D arrays, got {type(images).__name__}") from None
    if not images:
        raise ValueError("images must hold at least one image, got an empty sequence")
    return [_image_matrix(image, f"images[{i}]") for i, image in enumerate(images)]


def image_patches(n, size=12, images=None, seed=0, remove_mean="patch", dtype=None):
    """Square patches cut at random positions from grey-scale images, flattened to (n, size^2).

    Every position in the collection is equally likely: an image is drawn with probability
    proportional to its number of positions (h - size + 1)(w - size + 1), then a position
    uniformly within it. Patches are flattened row by row (patch.reshape(size, size) restores
    them).

    Mean removal:

    - ``"patch"`` (default): x <- x - mean(x) for every patch, i.e. the DC component is
      removed, as in the paper's setup (whitened patches without DC). The local mean
      brightness carries most of the variance of natural images (their power falls off
      like 1/f^2) but no edge or texture structure, and fields would be spent on it. It
      leaves the constant direction with zero variance, which :class:`Whitening` drops.
    - ``"global"``: subtract the mean patch (the per-pixel average over the n patches);
      every patch keeps its own brightness.
    - ``None``: raw intensities.

    :param int n: number of patches.
    :param int size: side length of the square patches (D = size^2).
    :param images: None for the bundled ``NATURAL_IMAGES``; or a name of a bundled image, a
        2-D array/tensor, an (M, h, w) stack, or a sequence of names and 2-D arrays (sizes
        may differ), each at least size x size.
    :param int seed: seed of the private generator (the global RNGs are untouched).
    :param remove_mean: "patch", "global" or None (see above).
    :param torch.dtype dtype: dtype of the result (default: torch's default dtype, float32).
    :returns: tensor of shape (n, size^2).
    """
    n = check_int(n, "n")
    size = check_int(size, "size", minimum=2)
    if remove_mean not in _MEAN_REMOVAL:
        raise ValueError(f"remove_mean must be one of {_MEAN_REMOVAL}, got {remove_mean!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    images = _image_list(images)
    for i, image in enumerate(images):
        if min(image.shape) < size:
            raise ValueError(f"images[{i}] has shape {image.shape}, smaller than the patch size "
                             f"size={size} in at least one dimension")
    positions = np.array([(h - size + 1) * (w - size + 1) for h, w in (image.shape for image in images)],
                         dtype=np.float64)
    generator = np.random.default_rng(seed)
    which = generator.choice(len(images), size=n, p=positions / positions.sum())
    patches = np.empty((n, size, size))
    for k, image in enumerate(images):
        selected = np.flatnonzero(which == k)
        if selected.size == 0:
            continue
        rows = generator.integers(0, image.shape[0] - size + 1, size=selected.size)
        columns = generator.integers(0, image.shape[1] - size + 1, size=selected.size)
        # A strided view of all windows: indexing it copies only the chosen patches.
        windows = np.lib.stride_tricks.sliding_window_view(image, (size, size))
        patches[selected] = windows[rows, columns]
    patches = patches.reshape(n, size * size)
    # In float64, before the cast, so a float32 result has no DC residual beyond rounding.
    if remove_mean == "patch":
        patches -= patches.mean(axis=1, keepdims=True)
    elif remove_mean == "global":
        patches -= patches.mean(axis=0, keepdims=True)
    return torch.as_tensor(patches, dtype=dtype or torch.get_default_dtype())
