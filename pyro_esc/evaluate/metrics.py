"""Dictionary quality measures: bars recovery by optimal matching, dictionary distance."""

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


class Recovery(NamedTuple):
    """How well a learned dictionary recovers a true one."""

    cosines: torch.Tensor  #: ``|cos|`` between each true column and its matched learned column, shape (H_true,)
    matching: torch.Tensor  #: index of the learned column matched to each true column, shape (H_true,)
    num_found: int  #: true columns whose matched ``|cos|`` exceeds the threshold
    all_found: bool  #: every true column found


def _check_dictionaries(learned, true):
    learned = torch.as_tensor(learned).detach()
    true = torch.as_tensor(true).detach()
    if learned.dim() != 2 or true.dim() != 2:
        raise ValueError(f"dictionaries must be matrices (D, H), got shapes {tuple(learned.shape)} and {tuple(true.shape)}")
    if learned.size(0) != true.size(0):
        raise ValueError(f"learned has data dimension {learned.size(0)} but true has {true.size(0)}")
    if learned.size(1) < true.size(1):
        raise ValueError(f"learned has {learned.size(1)} columns, fewer than the {true.size(1)} true columns")
    learned = learned.double()
    true = true.double()
    return learned / learned.norm(dim=0).clamp_min(1e-300), true / true.norm(dim=0).clamp_min(1e-300)


def bars_recovery(learned, true, threshold=0.95):
    """Match learned to true dictionary columns one-to-one and report the cosines.

    The matching maximises the summed absolute cosine (Hungarian algorithm), so
    one learned column can never explain two true ones. Signs are ignored: with
    a symmetric prior, w and -w are the same cause.

    :param learned: learned dictionary, shape (D, H) with H >= H_true.
    :param true: true dictionary, shape (D, H_true).
    :param float threshold: a true column counts as found when its matched ``|cos|`` exceeds this.
    :rtype: Recovery
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    learned, true = _check_dictionaries(learned, true)
    similarity = (true.T @ learned).abs().numpy()
    rows, columns = linear_sum_assignment(similarity, maximize=True)
    order = np.argsort(rows)
    cosines = torch.as_tensor(similarity[rows[order], columns[order]])
    num_found = int((cosines > threshold).sum())
    return Recovery(cosines, torch.as_tensor(columns[order]), num_found, num_found == true.size(1))


def dictionary_distance(learned, true):
    """Root-mean-square distance between matched, sign-aligned unit columns.

    0 for a perfect recovery (up to permutation and sign), sqrt(2) at most per column.
    """
    learned_unit, true_unit = _check_dictionaries(learned, true)
    recovery = bars_recovery(learned_unit, true_unit, threshold=1.0)
    matched = learned_unit[:, recovery.matching]
    signs = torch.sign((matched * true_unit).sum(0))
    signs[signs == 0] = 1
    return float((matched * signs - true_unit).square().sum(0).mean().sqrt())


def code_sparseness(codes):
    """Sparseness of codes (e.g. posterior means), shape (N, H): two standard measures.

    - ``kurtosis``: the mean over latents of the excess kurtosis of z_h across
      data points, E[(z - mean)^4] / var^2 - 3 (0 for a Gaussian, 3 for a
      Laplace; larger means heavier tails, i.e. sparser).
    - ``l1_l2``: the mean over data points of ||z||_1 / (sqrt(H) ||z||_2), in
      [1/sqrt(H), 1]; smaller means fewer active latents per point.

    :returns: dict with ``kurtosis`` and ``l1_l2`` (floats).
    """
    codes = torch.as_tensor(codes).detach().double()
    if codes.dim() != 2 or codes.size(0) < 2:
        raise ValueError(f"codes must have shape (N, H) with N >= 2, got {tuple(codes.shape)}")
    centred = codes - codes.mean(0)
    variance = centred.square().mean(0)
    kurtosis = centred.pow(4).mean(0) / variance.square().clamp_min(1e-300) - 3
    norms = codes.norm(dim=1)
    active = norms > 0
    ratio = codes[active].abs().sum(1) / (codes.size(1) ** 0.5 * norms[active])
    return {"kurtosis": float(kurtosis.mean()), "l1_l2": float(ratio.mean())}


def field_spread(fields, shape):
    """Spatial spread of image fields: how localised each field is, in pixels.

    Each field's energy w^2 is a distribution over pixel positions; its spread
    is sqrt(var_row + var_col) of that distribution (the radius of gyration).
    A field concentrated on one pixel has spread 0; a uniform field on a
    side x side patch has spread sqrt((side^2 - 1) / 6), about 0.41 side.

    :param fields: shape (D, H) with D = rows * cols (pixel-space fields, e.g.
        whitened fields mapped back through the inverse whitening).
    :param tuple shape: (rows, cols) of a field.
    :returns: tensor of spreads, shape (H,).
    """
    fields = torch.as_tensor(fields).detach().double()
    rows, cols = shape
    if fields.dim() != 2 or fields.size(0) != rows * cols:
        raise ValueError(f"fields must have shape ({rows * cols}, H) for shape {tuple(shape)}, got {tuple(fields.shape)}")
    energy = fields.square()
    weights = energy / energy.sum(0).clamp_min(1e-300)
    row_index = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
    col_index = torch.arange(cols, dtype=torch.float64).repeat(rows)
    spread = 0
    for index in (row_index, col_index):
        mean = index @ weights
        spread = spread + (index.square() @ weights - mean.square())
    return spread.clamp_min(0).sqrt()
