"""Figures: generative-field grids, training curves, samples of the training data.

Every function returns a matplotlib Figure and never calls ``plt.show()``; pass ``ax`` to
draw into an existing figure (e.g. fields at successive epochs side by side). Save and
close with :func:`save_figure`.

Image grids are drawn as one mosaic image in one axes (not one axes per field): a grid of
a few hundred fields stays fast to draw, and the tiles are separated by a coloured line
that no grey value can be mistaken for (see :func:`mosaic`).
"""

import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from ._checks import check_fields, check_int, check_positive
from .data import Whitening

#: Colour of the lines between tiles: not a grey, so it cannot be read as a pixel value.
SEPARATOR_COLOR = "#4c72b0"

_X_LABELS = {"step": "step", "wall_time": "wall-clock time (s)", "epoch": "epoch"}


def _as_numpy(value, name):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must hold real numbers: {error}") from error


def _tile_shape(dim, shape, name):
    """The (height, width) of one tile: ``shape`` if given, else a square side^2 = dim."""
    if shape is None:
        side = math.isqrt(dim)
        if side * side != dim:
            raise ValueError(f"{name} has {dim} values per image, not a square number: pass shape=(height, width)")
        return side, side
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"shape must be a pair of positive ints (height, width), got {shape!r}")
    if shape[0] * shape[1] != dim:
        raise ValueError(f"shape={tuple(shape)} has {shape[0] * shape[1]} pixels but {name} has {dim} "
                         f"values per image")
    return tuple(shape)


def _normalise(tiles, symmetric, normalize):
    """Scale tiles (M, h, w) to [-1, 1] (symmetric, 0 stays 0) or [0, 1] (min to max)."""
    if normalize not in ("each", "common"):
        raise ValueError(f"normalize must be 'each' or 'common', got {normalize!r}")
    axes = (1, 2) if normalize == "each" else (0, 1, 2)
    if symmetric:
        scale = np.abs(tiles).max(axis=axes, keepdims=True)
        return tiles / np.where(scale > 0, scale, 1.0)
    low = tiles.min(axis=axes, keepdims=True)
    span = tiles.max(axis=axes, keepdims=True) - low
    return (tiles - low) / np.where(span > 0, span, 1.0)


def _upsampling(height, width):
    """Pixels per tile pixel, so a 1-pixel separator stays thin next to small tiles (5x5 bars)."""
    return max(1, math.ceil(24 / max(height, width)))


def mosaic(tiles, ncols, symmetric=True):
    """Tiles (M, h, w) as one RGBA image: a grey-scale grid with coloured separators.

    Values in [-1, 1] (``symmetric``: -1 black, 0 mid-grey, 1 white) or [0, 1] (0 black,
    1 white). Every tile pixel becomes an r x r block (r = ceil(24 / max(h, w))) and tiles
    are framed by 1-pixel lines in ``SEPARATOR_COLOR``; cells after the last tile are
    transparent. Tile ``i`` sits at row i // ncols, column i % ncols, its pixels at
    [1 + row (h r + 1) :, 1 + column (w r + 1) :].

    :returns: float array (rows, columns, 4).
    """
    count, height, width = tiles.shape
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    r = _upsampling(height, width)
    cell_h, cell_w = height * r + 1, width * r + 1
    grey = (tiles + 1) / 2 if symmetric else tiles
    grey = np.clip(grey, 0.0, 1.0).repeat(r, axis=1).repeat(r, axis=2)
    separator = np.array(to_rgba(SEPARATOR_COLOR))
    image = np.zeros((nrows * cell_h + 1, ncols * cell_w + 1, 4))
    for index in range(count):
        row, column = divmod(index, ncols)
        top, left = row * cell_h, column * cell_w
        image[top:top + cell_h + 1, left:left + cell_w + 1] = separator
        image[top + 1:top + cell_h, left + 1:left + cell_w, :3] = grey[index][..., None]
    return image


def _draw_mosaic(ax, tiles, ncols, symmetric):
    image = ax.imshow(mosaic(tiles, ncols, symmetric), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    # The tiles carry their own frames; axes spines would box the empty cells too.
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def _figure_and_axes(ax, count, ncols, height, width):
    if ax is not None:
        if not hasattr(ax, "figure") or not hasattr(ax, "imshow"):
            raise ValueError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
        return ax.figure, ax
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    # About 0.55 inch per tile (the longer edge), clipped to fit a page.
    cell = 0.55 / max(height, width)
    fig_width = min(max(ncols * width * cell, 4.0), 12.0)
    fig_height = min(max(nrows * height * cell, 1.5), 12.0) + 0.9
    fig, ax = plt.subplots(figsize=(fig_width, fig_height), layout="constrained")
    return fig, ax


def _wrap(ax, text, fontsize):
    """Wrap ``text`` to the width of ``ax``'s figure: constrained layout does not shrink text."""
    fontsize = FontProperties(size=fontsize).get_size_in_points()
    width = ax.figure.get_size_inches()[0] * ax.get_position().width / 0.8
    # An average character is about half an em wide.
    columns = max(16, int(width * 72 / (0.5 * fontsize)))
    # Line by line: a caller's explicit line breaks stay where they are.
    return "\n".join(textwrap.fill(line, width=columns, break_on_hyphens=False) for line in text.split("\n"))


def _label(ax, title, xlabel):
    ax.set_title(_wrap(ax, title, plt.rcParams["axes.titlesize"]))
    if xlabel is not None:
        ax.set_xlabel(_wrap(ax, xlabel, "small"), fontsize="small")


def _check_ncols(ncols, count):
    if ncols is None:
        return max(1, math.ceil(math.sqrt(count)))
    return check_int(ncols, "ncols")


def plot_fields(dictionary, shape=None, whitening=None, order=None, ncols=None, title=None,
                align_sign=True, normalize="each", caption=True, ax=None):
    """A grid of generative fields, the columns of a dictionary W, shown as images.

    Each field is scaled symmetrically to its largest absolute value, so in the grey
    colormap 0 is mid-grey, positive is light and negative dark. Fields learned on whitened
    data are first mapped to pixel space through the inverse whitening, A W
    (:meth:`Whitening.fields_to_pixels`).

    :param dictionary: W, shape (D, H) (or (output_dim, H) with ``whitening``); tensor or array.
    :param shape: (height, width) of a field; default square, side = sqrt(D).
    :param Whitening whitening: the fitted whitening the data went through, or None.
    :param order: None keeps the column order; "norm" sorts by the pixel-space norm of the
        fields; a sequence of H numbers (e.g. ``model.prior_scale``) sorts by them. Largest first.
    :param int ncols: tiles per row (default: about square).
    :param str title: axes title (default "Generative fields (H = ...)").
    :param bool align_sign: flip each field so its largest-magnitude entry is positive
        (w and -w are the same cause under a symmetric prior; this shows bars all light).
    :param str normalize: "each" field to its own maximum, or one "common" scale for all.
    :param bool caption: write what the grey levels mean under the grid (turn off in panels
        that share one caption).
    :param ax: a matplotlib Axes to draw into; default a new figure.
    :returns: the matplotlib Figure.
    """
    fields = check_fields(dictionary, "dictionary")
    if whitening is not None:
        if not isinstance(whitening, Whitening):
            raise ValueError(f"whitening must be a fitted pyro_esc.data.Whitening or None, got "
                             f"{type(whitening).__name__}")
        fields = whitening.fields_to_pixels(fields)
    fields = fields.cpu().double().numpy().T  # (H, D)
    count, dim = fields.shape
    height, width = _tile_shape(dim, shape, "dictionary")
    if order is not None:
        if isinstance(order, str):
            if order != "norm":
                raise ValueError(f"order must be None, 'norm' or a sequence of H = {count} numbers, got {order!r}")
            keys = np.linalg.norm(fields, axis=1)
        else:
            keys = _as_numpy(order, "order")
            if keys.shape != (count,) or not np.isfinite(keys).all():
                raise ValueError(f"order must hold one finite number per field, shape ({count},), "
                                 f"got shape {keys.shape}")
        fields = fields[np.argsort(-keys, kind="stable")]
    if align_sign:
        peaks = fields[np.arange(count), np.abs(fields).argmax(axis=1)]
        fields = fields * np.where(peaks < 0, -1.0, 1.0)[:, None]
    tiles = _normalise(fields.reshape(count, height, width), symmetric=True, normalize=normalize)
    ncols = _check_ncols(ncols, count)
    fig, ax = _figure_and_axes(ax, count, ncols, height, width)
    _draw_mosaic(ax, tiles, ncols, symmetric=True)
    details = [f"{height}x{width}" + (" in pixel space (inverse whitening)" if whitening is not None else ""),
               "each field scaled to its max |w|" if normalize == "each" else "one common scale",
               "mid-grey = 0"]
    if order is not None:
        details.insert(1, "largest norm first" if isinstance(order, str) else "sorted by `order`, largest first")
    _label(ax, title if title is not None else f"Generative fields (H = {count})",
           "; ".join(details) if caption else None)
    return fig


def plot_data_samples(x, shape=None, n=16, seed=0, ncols=None, title=None, symmetric=True,
                      normalize="each", ax=None):
    """A grid of data points shown as images (e.g. training samples of the bars test).

    :param x: data, shape (N, D); tensor or array.
    :param shape: (height, width) of an image; default square, side = sqrt(D).
    :param int n: number of samples shown (all N if N < n).
    :param seed: seed of the random choice of samples; None shows the first n.
    :param int ncols: tiles per row (default: about square).
    :param str title: axes title (default "Data samples (n of N)").
    :param bool symmetric: scale so that 0 is mid-grey (data around zero: bars, patches);
        False stretches min..max to black..white (raw intensities).
    :param str normalize: "each" sample to its own range, or one "common" scale (keeps
        amplitudes comparable).
    :param ax: a matplotlib Axes to draw into; default a new figure.
    :returns: the matplotlib Figure.
    """
    data = _as_numpy(x, "x")
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"x must have shape (N, D) with N >= 1, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("x must be finite, but contains NaN or inf")
    n = check_int(n, "n")
    total, dim = data.shape
    height, width = _tile_shape(dim, shape, "x")
    n = min(n, total)
    if seed is None:
        chosen = np.arange(n)
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        chosen = np.random.default_rng(seed).choice(total, size=n, replace=False)
    tiles = _normalise(data[chosen].reshape(n, height, width), symmetric=bool(symmetric), normalize=normalize)
    ncols = _check_ncols(ncols, n)
    fig, ax = _figure_and_axes(ax, n, ncols, height, width)
    _draw_mosaic(ax, tiles, ncols, symmetric=bool(symmetric))
    each = normalize == "each"
    if symmetric:
        scale = ("each sample scaled to its max |x|" if each else "one scale for all (max |x|)") + "; mid-grey = 0"
    else:
        scale = ("each sample" if each else "all samples together") + " stretched from min (black) to max (white)"
    _label(ax, title if title is not None else f"Data samples ({n} of {total})", f"{height}x{width}; {scale}")
    return fig


def _series(history, name, label):
    """history.name (or history[name]) as a float array."""
    try:
        values = getattr(history, name) if hasattr(history, name) else history[name]
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"histories[{label!r}] has no {name!r} (expected list attributes step, elbo, "
                         f"wall_time, epoch)") from None
    return _as_numpy(values, f"histories[{label!r}].{name}").reshape(-1)


def plot_training_curves(histories, x="step", title="Training curves", ylim="auto", ax=None):
    """The objective per data point (higher is better) against steps, time or epochs, one line per run.

    :param histories: mapping label -> history, where a history has list attributes
        ``step``, ``elbo`` (objective per data point), ``wall_time`` (seconds) and ``epoch``
        (mappings with those keys work too).
    :param str x: the horizontal axis: "step", "wall_time" or "epoch".
    :param str title: axes title.
    :param ylim: "auto" starts the vertical axis so that the last 90% of every run is in
        view (the first steps are often far lower and would flatten the rest); None leaves
        matplotlib's limits; or a pair (bottom, top).
    :param ax: a matplotlib Axes to draw into; default a new figure.
    :returns: the matplotlib Figure.
    """
    if x not in _X_LABELS:
        raise ValueError(f"x must be one of {tuple(_X_LABELS)}, got {x!r}")
    if not hasattr(histories, "items") or len(histories) == 0:
        raise ValueError(f"histories must be a non-empty mapping label -> history, got {type(histories).__name__}")
    if not (ylim is None or ylim == "auto" or (isinstance(ylim, (tuple, list)) and len(ylim) == 2)):
        raise ValueError(f"ylim must be 'auto', None or a pair (bottom, top), got {ylim!r}")
    curves = []
    for label, history in histories.items():
        horizontal, objective = _series(history, x, label), _series(history, "elbo", label)
        if horizontal.shape != objective.shape:
            raise ValueError(f"histories[{label!r}] has {horizontal.size} {x} values but {objective.size} "
                             f"elbo values; they must match")
        if objective.size == 0:
            raise ValueError(f"histories[{label!r}] is empty")
        if not (np.isfinite(horizontal).all() and np.isfinite(objective).all()):
            raise ValueError(f"histories[{label!r}] holds NaN or inf values")
        curves.append((str(label), horizontal, objective))
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    else:
        fig = ax.figure
    for label, horizontal, objective in curves:
        ax.plot(horizontal, objective, label=label, marker="." if objective.size <= 30 else None)
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel("ELBO per data point (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if ylim == "auto":
        tails = np.concatenate([objective[len(objective) // 10:] for _, _, objective in curves])
        everything = np.concatenate([objective for _, _, objective in curves])
        bottom, top = tails.min(), everything.max()
        if everything.min() < bottom and top > bottom:
            margin = 0.05 * (top - bottom)
            ax.set_ylim(bottom - margin, top + margin)
    elif ylim is not None:
        ax.set_ylim(*ylim)
    return fig


def save_figure(fig, path, dpi=150):
    """Write a figure to ``path`` (format from the ending, folders created, margins trimmed) and close it.

    :param fig: a matplotlib Figure.
    :param path: the file to write, e.g. "figures/bars_fields.png".
    :param dpi: resolution of raster formats.
    :returns: the path written, as a pathlib.Path.
    """
    if not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if not isinstance(path, (str, Path)) and not hasattr(path, "__fspath__"):
        raise ValueError(f"path must be a path (str or os.PathLike), got {type(path).__name__}")
    dpi = check_positive(dpi, "dpi")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" keeps titles and labels inside the file even for figures made without constrained layout.
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    # Closing releases pyplot's reference; scripts writing many figures would otherwise leak.
    plt.close(fig)
    return path
