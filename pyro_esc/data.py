"""Data sets for sparse coding: artificial bars, natural image patches, whitening, user data.

Natural images come from files that ship inside installed packages (scikit-image's and
scikit-learn's sample images), so nothing is downloaded at run time.
"""

import importlib.util
import numbers
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ._checks import check_data, check_int, check_positive


def bars_dictionary(side=5, dtype=None):
    """The 2 * side horizontal and vertical bars of a side x side image as unit-length columns.

    :returns: tensor of shape (side * side, 2 * side); columns 0..side-1 are the
        horizontal bars (rows), side..2 side-1 the vertical ones.
    """
    side = check_int(side, "side", minimum=2)
    images = torch.zeros(2 * side, side, side, dtype=dtype or torch.get_default_dtype())
    for k in range(side):
        images[k, k, :] = 1.0
        images[side + k, :, k] = 1.0
    columns = images.reshape(2 * side, side * side).T
    return columns / columns.norm(dim=0)


def bars(n, side=5, noise=0.3, scale=1.0, seed=0, dtype=None):
    """The standard bars test: superpositions of horizontal and vertical bars.

    Each data point is x = sum_h a_h b_h + noise * eps, where b_h is a bar image
    with pixel value 1 on the bar (2 * side bars), a_h ~ Laplace(0, scale) and
    eps ~ Normal(0, I). In the model's unit-column parameterisation this is
    W = the normalised bars and lambda_h = scale * sqrt(side).

    :param int n: number of data points.
    :param int side: image side length (D = side^2, H = 2 side).
    :param float noise: noise standard deviation sigma.
    :param float scale: Laplace scale of the bar amplitudes.
    :param int seed: seed of the private generator (the global RNG is untouched).
    :returns: ``(x, dictionary)``: data (n, side^2) and the true unit-column dictionary (side^2, 2 side).
    """
    n = check_int(n, "n")
    noise = float(noise)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    scale = check_positive(scale, "scale")
    dictionary = bars_dictionary(side, dtype)
    generator = torch.Generator().manual_seed(int(seed))
    hidden = dictionary.size(1)
    uniform = torch.rand(n, hidden, generator=generator, dtype=dictionary.dtype) - 0.5
    # Inverse-CDF Laplace sampling with the private generator.
    amplitudes = -scale * uniform.sign() * torch.log1p(-2 * uniform.abs())
    bar_images = dictionary * side ** 0.5
    x = amplitudes @ bar_images.T + noise * torch.randn(n, side * side, generator=generator, dtype=dictionary.dtype)
    return x, dictionary


# ----------------------------------------------------------------------------------------
# Natural images that ship inside installed packages

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

#: File name endings that :func:`load_image_folder` reads (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".pgm", ".ppm", ".pnm", ".webp")


def _bundled_path(name):
    package, relative = BUNDLED_IMAGES[name]
    distribution = _DISTRIBUTIONS[package]
    # find_spec locates a top-level package without importing it (importing skimage is slow).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the natural image {name!r} ships with {distribution}, which is not installed; "
                          f"install it with `pip install {distribution}` (or `pip install pyro-esc[extras]`)")
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


def _read_image(path):
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
def _bundled_image(name):
    image = _read_image(_bundled_path(name))
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
    return _bundled_image(name).copy()


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


# ----------------------------------------------------------------------------------------
# Patches

_MEAN_REMOVAL = ("patch", "global", None)


def _image_matrix(image, name):
    """A caller's image as a finite float64 numpy matrix."""
    if isinstance(image, str):
        if image not in BUNDLED_IMAGES:
            raise ValueError(f"{name} names no bundled image: expected one of {sorted(BUNDLED_IMAGES)}, "
                             f"got {image!r}")
        return _bundled_image(image)
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
        return [_bundled_image(name) for name in NATURAL_IMAGES]
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


# ----------------------------------------------------------------------------------------
# Whitening

class Whitening:
    """Decorrelate data and scale every kept direction to unit variance: PCA or ZCA whitening.

    With the data mean m and covariance C = 1/N sum_n (x_n - m)(x_n - m)^T = U diag(l) U^T
    (eigenvalues l decreasing; U_k the first k eigenvectors as columns):

        PCA:  y = diag(l_k + e)^(-1/2) U_k^T (x - m)       k numbers per data point
        ZCA:  y = U_k diag(l_k + e)^(-1/2) U_k^T (x - m)   D numbers per data point

    ZCA is the whitening closest to the identity map (its matrix is symmetric), so whitened
    patches still look like patches; PCA also reduces the dimension when k < D. With e = 0
    the whitened data of the fitted set have covariance I_k (PCA) or U_k U_k^T (ZCA; I_D
    when every component is kept).

    The inverse is x = m + A y with ``dewhitening_matrix`` A = U_k diag(l_k + e)^(1/2)
    (PCA) or U_k diag(l_k + e)^(1/2) U_k^T (ZCA); with k < D it is a pseudo-inverse that
    keeps the leading k directions. A model y = W z + noise learned on whitened data is in
    pixel space x = m + (A W) z + A noise, so A W are its generative fields in pixel space:
    :meth:`fields_to_pixels`. (For PCA with k < D the fields live in the reduced space and
    can only be displayed this way.)

    Directions whose variance is zero up to rounding - such as the constant patch after
    per-patch mean removal - are always dropped: whitening them would blow rounding noise up
    to unit variance.

    :param str method: "zca" (default) or "pca".
    :param n_components: the components kept: None keeps every direction with non-zero
        variance; an int k keeps the leading k; a float in (0, 1] keeps the fewest leading
        components that explain at least that fraction of the variance.
    :param float epsilon: regulariser added to every eigenvalue, e = epsilon * mean(l) (a
        fraction of the average per-dimension variance, so the result does not depend on the
        data's units). The default is only a numerical safeguard; values like 1e-2 damp the
        low-variance (for images: high-frequency, noise-dominated) directions.
    :param float tol: eigenvalues at most tol * max(l) count as zero variance; default
        max(machine epsilon of the data's dtype, D * float64 epsilon).
    """

    def __init__(self, method="zca", n_components=None, epsilon=1e-8, tol=None):
        if method not in ("zca", "pca"):
            raise ValueError(f"method must be 'zca' or 'pca', got {method!r}")
        if n_components is not None:
            if isinstance(n_components, bool) or not isinstance(n_components, numbers.Real):
                raise ValueError(f"n_components must be None, an int >= 1 or a float in (0, 1], "
                                 f"got {n_components!r}")
            if isinstance(n_components, numbers.Integral):
                n_components = check_int(n_components, "n_components")
            elif not 0 < n_components <= 1:
                raise ValueError(f"n_components as a float is a fraction of the variance and must be in "
                                 f"(0, 1], got {n_components!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0 <= epsilon < np.inf:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        if tol is not None:
            tol = check_positive(tol, "tol")
        self.method = method
        self.n_components = n_components
        self.epsilon = float(epsilon)
        self.tol = tol
        self._state = None

    def __repr__(self):
        fitted = (f", fitted: {self.input_dim} -> {self.output_dim}, {self.n_kept} components"
                  if self.is_fitted else "")
        return (f"Whitening(method={self.method!r}, n_components={self.n_components!r}, "
                f"epsilon={self.epsilon!r}{fitted})")

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, x):
        """Estimate the mean and covariance of ``x`` and build the whitening.

        :param x: data, shape (N, D) with N >= 2; a tensor or array.
        :returns: self.
        """
        x = check_data(x, "x", allow_numpy=True)
        if x.size(0) < 2:
            raise ValueError(f"x must hold at least 2 data points to estimate a covariance, got shape {tuple(x.shape)}")
        dim = x.size(1)
        # float64 throughout: small eigenvalues are what whitening divides by.
        data = x.detach().to(torch.float64)
        mean = data.mean(0)
        centred = data - mean
        covariance = centred.T @ centred / data.size(0)
        # The D x D decomposition runs in numpy: it is small, works for data on any device,
        # and torch.linalg.eigh was 100x slower with several CPU threads (torch 2.13).
        eigenvalues, eigenvectors = np.linalg.eigh(covariance.cpu().numpy())
        eigenvalues = torch.as_tensor(eigenvalues[::-1].copy(), device=data.device)
        eigenvectors = torch.as_tensor(eigenvectors[:, ::-1].copy(), device=data.device)
        # Fix eigenvector signs (largest entry positive) so PCA outputs are reproducible.
        biggest = eigenvectors.abs().argmax(0)
        signs = torch.sign(eigenvectors.gather(0, biggest[None])).squeeze(0)
        eigenvectors = eigenvectors * torch.where(signs == 0, torch.ones_like(signs), signs)
        largest = float(eigenvalues[0])
        if not largest > 0:
            raise ValueError("x has zero variance in every direction; there is nothing to whiten")
        tol = self.tol if self.tol is not None else max(torch.finfo(x.dtype).eps, dim * torch.finfo(torch.float64).eps)
        rank = int((eigenvalues > tol * largest).sum())
        kept = self._kept(eigenvalues[:rank], rank, dim)
        self._state = {
            "mean": mean,
            "components": eigenvectors[:, :kept].T.contiguous(),
            "variances": eigenvalues[:kept].clone(),
            "regulariser": self.epsilon * float(eigenvalues.clamp_min(0).mean()),
        }
        self._build()
        return self

    def _kept(self, variances, rank, dim):
        if self.n_components is None:
            return rank
        if isinstance(self.n_components, int):
            if self.n_components > dim:
                raise ValueError(f"n_components={self.n_components} exceeds the data dimension D = {dim}")
            if self.n_components > rank:
                raise ValueError(f"n_components={self.n_components}, but x has only {rank} directions with "
                                 f"non-zero variance (the rest are zero up to rounding)")
            return self.n_components
        explained = torch.cumsum(variances, 0) / variances.sum()
        # The fewest components reaching the fraction; the small slack absorbs rounding at 1.0.
        return min(int(torch.searchsorted(explained, torch.tensor(self.n_components - 1e-12,
                                                                  dtype=explained.dtype))) + 1, rank)

    def _build(self):
        state = self._state
        basis = state["components"].T  # (D, k)
        scales = (state["variances"] + state["regulariser"]).sqrt()
        if not bool((scales > 0).all()):
            raise ValueError("whitening needs positive variances in every kept direction")
        if self.method == "pca":
            self._matrix = (basis / scales).T
            self._inverse = basis * scales
        else:
            self._matrix = (basis / scales) @ basis.T
            self._inverse = (basis * scales) @ basis.T

    def fit_transform(self, x):
        """:meth:`fit` to ``x``, then return :meth:`transform` of it."""
        return self.fit(x).transform(x)

    # -- fitted state ----------------------------------------------------------------------

    @property
    def is_fitted(self):
        return self._state is not None

    def _fitted(self):
        if self._state is None:
            raise ValueError("this Whitening is not fitted yet: call fit(x) first")
        return self._state

    @property
    def mean(self):
        """The data mean m, shape (D,), float64."""
        return self._fitted()["mean"]

    @property
    def components(self):
        """The kept eigenvectors of the covariance as rows, shape (k, D), decreasing variance."""
        return self._fitted()["components"]

    @property
    def variances(self):
        """The kept eigenvalues l_k of the covariance, shape (k,), decreasing."""
        return self._fitted()["variances"]

    @property
    def n_kept(self):
        """The number k of kept components."""
        return self.components.size(0)

    @property
    def input_dim(self):
        """The data dimension D."""
        return self.components.size(1)

    @property
    def output_dim(self):
        """The dimension of whitened data: k for PCA, D for ZCA."""
        return self.n_kept if self.method == "pca" else self.input_dim

    @property
    def whitening_matrix(self):
        """M with y = M (x - m): shape (k, D) for PCA, (D, D) and symmetric for ZCA."""
        self._fitted()
        return self._matrix

    @property
    def dewhitening_matrix(self):
        """A with x = m + A y, shape (D, output_dim): maps whitened-space fields to pixel space."""
        self._fitted()
        return self._inverse

    # -- maps ------------------------------------------------------------------------------

    def transform(self, x):
        """Whiten data: y = M (x - m) for every row x.

        :param x: data of shape (N, D); tensor or array.
        :returns: tensor (N, output_dim) in the dtype and on the device of ``x``.
        """
        self._fitted()
        x = check_data(x, "x", data_dim=self.input_dim, allow_numpy=True)
        matrix = self._matrix.to(dtype=x.dtype, device=x.device)
        return (x - self.mean.to(dtype=x.dtype, device=x.device)) @ matrix.T

    def inverse_transform(self, y):
        """Map whitened data back: x = m + A y for every row y.

        :param y: whitened data of shape (N, output_dim); tensor or array.
        :returns: tensor (N, D) in the dtype and on the device of ``y``.
        """
        self._fitted()
        y = check_data(y, "y", data_dim=self.output_dim, allow_numpy=True)
        inverse = self._inverse.to(dtype=y.dtype, device=y.device)
        return y @ inverse.T + self.mean.to(dtype=y.dtype, device=y.device)

    def fields_to_pixels(self, fields):
        """Generative fields learned on whitened data, in pixel space: A W (no mean added).

        :param fields: dictionary W of shape (output_dim, H), one field per column.
        :returns: tensor (D, H) in the dtype and on the device of ``fields``.
        """
        self._fitted()
        fields = _check_fields(fields, "fields")
        if fields.size(0) != self.output_dim:
            raise ValueError(f"fields must have shape (output_dim, H) = ({self.output_dim}, H) for this "
                             f"whitening, got {tuple(fields.shape)}")
        return self._inverse.to(dtype=fields.dtype, device=fields.device) @ fields

    # -- saving ----------------------------------------------------------------------------

    def state_dict(self):
        """Everything needed to rebuild this whitening (for torch.save / checkpoints)."""
        state = self._fitted()
        return {"method": self.method, "n_components": self.n_components, "epsilon": self.epsilon,
                "tol": self.tol, "mean": state["mean"], "components": state["components"],
                "variances": state["variances"], "regulariser": state["regulariser"]}

    @classmethod
    def from_state_dict(cls, state):
        """Rebuild a fitted whitening from :meth:`state_dict`'s output."""
        try:
            whitening = cls(state["method"], state["n_components"], state["epsilon"], state["tol"])
            whitening._state = {key: state[key] for key in ("mean", "components", "variances", "regulariser")}
        except (KeyError, TypeError) as error:
            raise ValueError(f"state must be a dict from Whitening.state_dict(), missing or bad: {error}") from error
        whitening._build()
        return whitening


def _check_fields(fields, name):
    """A dictionary (D, H) as a finite floating tensor (tensors and arrays accepted)."""
    if not isinstance(fields, torch.Tensor):
        fields = torch.as_tensor(np.asarray(fields, dtype=np.float64))
    fields = fields.detach()
    if not torch.is_floating_point(fields):
        fields = fields.to(torch.get_default_dtype())
    if fields.dim() != 2 or fields.numel() == 0:
        raise ValueError(f"{name} must be a non-empty matrix (D, H) with one field per column, "
                         f"got shape {tuple(fields.shape)}")
    if not bool(torch.isfinite(fields).all()):
        raise ValueError(f"{name} must be finite, but contains NaN or inf")
    return fields


# ----------------------------------------------------------------------------------------
# A user's own data

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
    images = [_read_image(file) for file in files]
    if not stack:
        return images
    for file, image in zip(files, images):
        if image.shape != images[0].shape:
            raise ValueError(f"stack=True needs images of one size, but {files[0]} is {images[0].shape} and "
                             f"{file} is {image.shape}; use stack=False (e.g. for image_patches)")
    return torch.as_tensor(np.stack([image.reshape(-1) for image in images]),
                           dtype=dtype or torch.get_default_dtype())
