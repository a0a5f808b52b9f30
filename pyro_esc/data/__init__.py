"""Data sets for sparse coding: artificial bars, natural image patches, whitening, user data.

Natural images come from files that ship inside installed packages (scikit-image's and
scikit-learn's sample images), so nothing is downloaded at run time.

Submodules, one job each:

- :mod:`pyro_esc.data.synthetic`: the bars test (:func:`bars`, :func:`bars_dictionary`).
  (Not named ``bars``: a submodule of that name would be shadowed by the function.)
- :mod:`pyro_esc.data.images`: the bundled natural images (``BUNDLED_IMAGES``,
  ``NATURAL_IMAGES``, :func:`bundled_images`, :func:`natural_image`, :func:`natural_images`)
  and reading any image file in grey-scale.
- :mod:`pyro_esc.data.patches`: random square patches cut from images (:func:`image_patches`).
- :mod:`pyro_esc.data.whitening`: PCA and ZCA whitening (:class:`Whitening`).
- :mod:`pyro_esc.data.loaders`: a user's own data (:func:`load_array`,
  :func:`load_image_folder`, ``IMAGE_EXTENSIONS``).

Every name is re-exported here, so ``from pyro_esc.data import X`` works as before the split.
"""

from .images import BUNDLED_IMAGES, NATURAL_IMAGES, bundled_images, natural_image, natural_images
from .loaders import IMAGE_EXTENSIONS, load_array, load_image_folder
from .patches import image_patches
from .synthetic import bars, bars_dictionary
from .whitening import Whitening

__all__ = [
    "BUNDLED_IMAGES",
    "IMAGE_EXTENSIONS",
    "NATURAL_IMAGES",
    "Whitening",
    "bars",
    "bars_dictionary",
    "bundled_images",
    "image_patches",
    "load_array",
    "load_image_folder",
    "natural_image",
    "natural_images",
]
