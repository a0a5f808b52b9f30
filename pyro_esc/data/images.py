"""Natural images that ship inside installed packages, read from disk in grey-scale.

Nothing is downloaded at run time: scikit-image's and scikit-learn's sample image files are
read directly with Pillow, and any image file can be read with :func:`read_image`.
"""

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

#: Every bundled image this module can load: name -> (package, file inside the package).
#: The files are read directly (with Pillow, which matplotlib depends on), never through
#: the packages' own loaders: those fall back to a network download when a file is missing.
BUNDLED_IMAGES = {
    "camera": ("skimage", "data/camera.png"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "brick": ("skimage", "data/brick.png"),
    "moon": ("skimage", "data/moon.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}

#: The default images for patches: photographs of natural scenes and natural textures.
#: Left out (still loadable by name): "brick" (a periodic man-made grid whose two
#: orientations would dominate the fields), "moon" (mostly smooth), "rocket" (mostly dark
#: sky), "motorcycle" (man-made).
NATURAL_IMAGES = ("camera", "astronaut", "coffee", "chelsea", "grass", "gravel", "china", "flower")

_DISTRIBUTIONS = {"skimage": "scikit-image", "sklearn": "scikit-learn"}

# ITU-R BT.709 luma weights, the ones skimage.color.rgb2gray uses, so that grey images
# here equal that library's conversion.
_LUMA = np.array([0.2125, 0.7154, 0.0721])

# Pillow modes that are already one channel; every other mode is converted to RGB first.
_GREY_MODES = {"1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _bundled_path(name):
    package, relative = BUNDLED_IMAGES[name]
    distribution = _DISTRIBUTIONS[package]
    # find_spec locates a top-level package without importing it (importing skimage is slow).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the natural image {name!r} ships with {distribution}, which is not installed; "
                          f"install it with `pip install {distribution}` (a dependency of pyro_esc: `pip install -e .` in "
                          f"a checkout installs it)")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"{distribution} is installed but does not bundle {relative} (needed for the "
                            f"natural image {name!r}); pyro_esc never downloads data. Use another image "
                            f"(see bundled_images()) or your own (load_image_folder, load_array)")


def _to_grey(array, source):
    """An image array from Pillow as a float64 grey-scale matrix; 8- and 16-bit values scaled to [0, 1]."""
    if array.dtype == bool:
        array = array.astype(np.float64)
    elif array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        array = array.astype(np.float64) / np.iinfo(array.dtype).max
    elif array.dtype.kind in "iuf":
        array = array.astype(np.float64)
    else:
        raise ValueError(f"{source} holds pixel values of dtype {array.dtype}, expected real numbers")
    if array.ndim == 3:
        array = array[..., :3] @ _LUMA
    if array.ndim != 2 or min(array.shape) == 0:
        raise ValueError(f"{source} is not a 2-D image (array shape {array.shape})")
    if not np.isfinite(array).all():
        raise ValueError(f"{source} contains NaN or infinite pixel values")
    return array


def read_image(path):
    """One image file as a float64 grey-scale matrix of shape (height, width).

    Colour images are converted with the ITU-R BT.709 luma weights (alpha dropped), 8- and
    16-bit values are scaled to [0, 1], float images are kept as stored, and a multi-frame
    file gives its first frame.

    :param path: the image file.
    :raises ValueError: if the file cannot be read as an image or holds no finite 2-D image.
    """
    from PIL import Image  # a dependency of matplotlib, so always present

    try:
        with Image.open(path) as image:
            if image.mode not in _GREY_MODES:
                image = image.convert("RGB")
            # asarray decodes the pixels, so truncated files fail here, inside the try.
            array = np.asarray(image)
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad files
        raise ValueError(f"could not read {path} as an image: {type(error).__name__}: {error}") from error
    return _to_grey(array, source=str(path))


@lru_cache(maxsize=None)
def cached_image(name):
    """One bundled image in grey-scale, read from disk once and then served from a cache.

    The returned array is read-only and shared by every caller; :func:`natural_image` gives a
    private copy. Clear the cache with ``cached_image.cache_clear()``.

    :param str name: a key of ``BUNDLED_IMAGES`` (not validated here).
    :returns: read-only float64 numpy array of shape (height, width), values in [0, 1].
    """
    image = read_image(_bundled_path(name))
    image.setflags(write=False)  # shared by every caller through the cache
    return image


def bundled_images():
    """The bundled natural images present on disk in this installation.

    Listing reads no pixels. Images of a package that is not installed, or that a version
    of it no longer ships, are simply absent.

    :returns: dict mapping each available name (a key of ``BUNDLED_IMAGES``) to its file.
    """
    available = {}
    for name in BUNDLED_IMAGES:
        try:
            available[name] = _bundled_path(name)
        except (ImportError, FileNotFoundError):
            continue
    return available


def natural_image(name):
    """One bundled natural image in grey-scale, values in [0, 1].

    Colour images are converted with the ITU-R BT.709 luma weights
    grey = 0.2125 R + 0.7154 G + 0.0721 B (as skimage.color.rgb2gray does).

    :param str name: a key of ``BUNDLED_IMAGES``, e.g. "camera", "grass", "china".
    :returns: float64 numpy array of shape (height, width), a fresh copy.
    :raises ImportError: if the package that ships the image is not installed.
    """
    if not isinstance(name, str) or name not in BUNDLED_IMAGES:
        raise ValueError(f"name must be one of {sorted(BUNDLED_IMAGES)}, got {name!r}")
    return cached_image(name).copy()


def natural_images(names=None):
    """Several bundled natural images in grey-scale (see :func:`natural_image`).

    :param names: sequence of names; default ``NATURAL_IMAGES`` (natural scenes and textures).
    :returns: list of float64 numpy arrays (height, width), values in [0, 1].
    """
    names = NATURAL_IMAGES if names is None else names
    # A lone string is rejected rather than read letter by letter.
    names = list(names) if hasattr(names, "__iter__") and not isinstance(names, str) else names
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"names must be a non-empty sequence of image names from {sorted(BUNDLED_IMAGES)}, "
                         f"got {names!r}")
    return [natural_image(name) for name in names]
