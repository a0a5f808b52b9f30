"""Which fields of figures/patches_fields.png are the checkerboards? Spatial frequency by grid row.

The figure shows 144 fields learned from ZCA-whitened 12x12 patches (H = D: a complete dictionary),
sorted by prior scale lambda, largest first. The model behind it was not saved, so this reads the
committed figure: it finds the 12 x 12 grid of tiles by its blue separators, samples each tile at the
centres of its 12 x 12 field pixels, and reports the power-weighted mean spatial frequency
(cycles per pixel, radial) of each field, averaged over each grid row. Run:

    python benchmarks/field_frequencies.py [--figure figures/patches_fields.png] [--pixels 12]
"""

import argparse

import matplotlib.image
import numpy as np


def _runs(indices):
    """(first, last) of each run of consecutive indices."""
    runs = []
    for i in indices:
        if runs and i - runs[-1][1] <= 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def tiles(figure_path, pixels):
    """The fields in the figure, as a (rows, columns, pixels, pixels) array of grey values."""
    image = matplotlib.image.imread(figure_path)[..., :3]
    separator = image[..., 2] > image[..., 0] + 0.15          # the blue lines between tiles
    columns = _runs(np.where(separator.mean(0) > 0.5)[0])
    rows = _runs(np.where(separator.mean(1) > 0.5)[0])
    grey = image.mean(-1)
    fields = np.empty((len(rows) - 1, len(columns) - 1, pixels, pixels))
    for r in range(len(rows) - 1):
        for c in range(len(columns) - 1):
            tile = grey[rows[r][1] + 1:rows[r + 1][0], columns[c][1] + 1:columns[c + 1][0]]
            centres_y = ((np.arange(pixels) + 0.5) * tile.shape[0] / pixels).astype(int)
            centres_x = ((np.arange(pixels) + 0.5) * tile.shape[1] / pixels).astype(int)
            fields[r, c] = tile[np.ix_(centres_y, centres_x)]
    return fields


def mean_frequency(field):
    """Power-weighted mean radial spatial frequency of one field, in cycles per pixel."""
    power = np.abs(np.fft.fft2(field - field.mean())) ** 2
    k = np.fft.fftfreq(field.shape[0])
    radius = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    return float((power * radius).sum() / power.sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", default="figures/patches_fields.png")
    parser.add_argument("--pixels", type=int, default=12, help="field side in pixels")
    args = parser.parse_args(argv)
    fields = tiles(args.figure, args.pixels)
    by_row = [np.mean([mean_frequency(f) for f in row]) for row in fields]
    print("grid row (largest lambda first):", " ".join(f"{i + 1:>5}" for i in range(len(by_row))))
    print("mean frequency (cycles/pixel):  ", " ".join(f"{f:5.3f}" for f in by_row))
    return by_row


if __name__ == "__main__":
    main()
