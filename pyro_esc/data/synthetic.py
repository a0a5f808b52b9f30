"""Synthetic data: the bars test, superpositions of horizontal and vertical bars with Laplace amplitudes."""

import torch

from .._checks import check_int, check_positive


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
