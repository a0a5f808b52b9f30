"""A user's own data: .npy arrays and folders of image files."""

from pathlib import Path

import numpy as np
import torch

from .._checks import check_data
from .images import read_image

#: File name endings that :func:`load_image_folder` reads (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".pgm", ".ppm", ".pnm", ".webp")


def _check_path(path, name):
    if not isinstance(path, (str, Path)) and not hasattr(path, "__fspath__"):
        raise ValueError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    return Path(path).expanduser()


def load_array(path, dtype=None):
    """A user's data set from a .npy file (written by numpy.save) as an (N, D) tensor.

    A 2-D array is taken as N data points of dimension D; a 3-D array (N, h, w) as a stack
    of grey-scale images, each flattened row by row to D = h w. Only plain numeric arrays are
    read (no pickled Python objects, which could run code on load).

    :param path: the .npy file.
    :param torch.dtype dtype: dtype of the result (default: torch's default dtype, float32).
    :returns: tensor of shape (N, D).
    """
    path = _check_path(path, "path")
    if path.suffix.lower() != ".npy":
        raise ValueError(f"path must name a .npy file (numpy.save format), got {path}")
    if not path.is_file():
        raise ValueError(f"path {path} does not exist or is not a file")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - any failure means the file is not a readable .npy
        raise ValueError(f"could not read {path} as a .npy array: {type(error).__name__}: {error}") from error
    if not isinstance(array, np.ndarray):
        # np.load opens a zip archive (.npz) whatever its name says.
        if hasattr(array, "close"):
            array.close()
        raise ValueError(f"{path} is not a .npy array file (it looks like an .npz archive)")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{path} must hold real numbers, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array.reshape(array.shape[0], -1)
    elif array.ndim != 2:
        raise ValueError(f"{path} holds an array of shape {array.shape}; expected (N, D) data points or an "
                         f"(N, height, width) stack of grey-scale images")
    if 0 in array.shape:
        raise ValueError(f"{path} holds an empty array of shape {array.shape}")
    check_data(torch.as_tensor(array.astype(np.float64, copy=False)), name=f"the array in {path}")
    dtype = dtype or torch.get_default_dtype()
    x = torch.as_tensor(array).to(dtype)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"the array in {path} overflows {dtype}: its values are too large for that dtype")
    return x


def load_image_folder(path, extensions=IMAGE_EXTENSIONS, recursive=False, stack=False, dtype=None):
    """A user's folder of images, in grey-scale.

    Files are read in sorted path order; files with other endings (and hidden files) are
    ignored. Colour images are converted with grey = 0.2125 R + 0.7154 G + 0.0721 B (alpha
    dropped), 8- and 16-bit values are scaled to [0, 1], float images are kept as stored,
    and multi-frame files give their first frame.

    :param path: the folder.
    :param extensions: file endings to read, e.g. (".png", ".jpg"); case-insensitive.
    :param bool recursive: also read sub-folders.
    :param bool stack: return one (N, height * width) tensor of the flattened images (all
        must have the same size) instead of a list of images (sizes may differ; the input
        :func:`image_patches` takes).
    :param torch.dtype dtype: dtype of the stacked tensor (default: torch's default dtype).
    :returns: list of float64 numpy arrays (height, width), or with ``stack`` a tensor (N, D).
    """
    path = _check_path(path, "path")
    if isinstance(extensions, str) or not extensions or not all(
            isinstance(ending, str) and ending.startswith(".") for ending in extensions):
        raise ValueError(f"extensions must be a non-empty sequence of file endings such as ('.png', '.jpg'), "
                         f"got {extensions!r}")
    endings = {ending.lower() for ending in extensions}
    if not path.is_dir():
        raise ValueError(f"path {path} does not exist or is not a folder")
    candidates = path.rglob("*") if recursive else path.iterdir()
    files = sorted(file for file in candidates
                   if file.is_file() and file.suffix.lower() in endings and not file.name.startswith("."))
    if not files:
        raise ValueError(f"no image files ({', '.join(sorted(endings))}) found in {path}"
                         + ("" if recursive else " (sub-folders are not searched unless recursive=True)"))
    images = [read_image(file) for file in files]
    if not stack:
        return images
    for file, image in zip(files, images):
        if image.shape != images[0].shape:
            raise ValueError(f"stack=True needs images of one size, but {files[0]} is {images[0].shape} and "
                             f"{file} is {image.shape}; use stack=False (e.g. for image_patches)")
    return torch.as_tensor(np.stack([image.reshape(-1) for image in images]),
                           dtype=dtype or torch.get_default_dtype())
