"""Dictionary quality measures: bars recovery by optimal matching, dictionary distance."""

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


class Recovery(NamedTuple):
    """How well a learned dictionary recovers a true one."""

    cosines: torch.Tensor  #: |cos| between each true column and its matched learned column, shape (H_true,)
    matching: torch.Tensor  #: index of the learned column matched to each true column, shape (H_true,)
    num_found: int  #: true columns whose matched |cos| exceeds the threshold
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
    :param float threshold: a true column counts as found when its matched |cos| exceeds this.
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
