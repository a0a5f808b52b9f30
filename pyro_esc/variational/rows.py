"""Row access to per-point parameters: what makes a minibatch step cost O(batch).

A per-point guide (one Gaussian per data point: :class:`~pyro_esc.guides.LocalMultivariateNormal`,
Pyro's ``AutoNormal``) keeps its parameters as (N, ...) tensors in Pyro's param
store. Read the usual way, a minibatch evaluation constrains all N rows
(``pyro.param``), slices the batch, and its backward pass writes a dense (N, ...)
gradient that an optimiser then applies to every row: O(N) work per step for
O(B) information, and Adam's momentum keeps moving points that were not in the
batch.

This module lets the row-wise route of :func:`~pyro_esc.fit`
(:class:`~pyro_esc.rowwise.RowwiseStep`) hand the guide only the batch's rows:

- :func:`per_point_parameters` names a guide's per-point parameters (param-store
  names, each with its constraint); guides declare them with a method
  ``per_point_parameters()`` returning param-store names (:func:`parameter_name`),
  or a function registered with ``per_point_parameters.register(GuideClass)``;
- :func:`batch_rows` is a context in which those parameters' rows for one
  minibatch are given (as tensors that the step differentiates);
- :func:`substituted_rows` is what a guide's ``gaussian_posterior`` reader calls
  first: inside :func:`batch_rows` it returns the given rows (and records the
  read), outside it returns None and the reader reads the param store as usual.

Nothing here changes a parameter: the step that owns the rows writes them back.
"""

import contextlib
import functools
from typing import NamedTuple

import torch

from pyro.infer.autoguide import AutoNormal

from .._pyro_internals import param_constraint, param_fullname

__all__ = ["PerPointParameter", "autonormal_row_names", "batch_rows", "offers_row_access", "parameter_name",
           "per_point_parameters", "substituted_rows"]


class PerPointParameter(NamedTuple):
    """A parameter with one row per data point: its param-store name and constraint."""

    name: str
    constraint: object


@functools.singledispatch
def _declared(guide):
    method = getattr(guide, "per_point_parameters", None)
    return method() if callable(method) else None


def per_point_parameters(guide):
    """The per-point parameters of ``guide`` that its reader can take as batch rows, or None.

    None means the guide offers no row access (an amortised guide, a joint one,
    or a guide this module does not know), and a minibatch step must go through
    the param store (the SVI route). Call it after the guide has created its
    parameters (after one evaluation).

    :returns: a list of :class:`PerPointParameter`, or None.
    """
    names = _declared.dispatch(type(guide))(guide)
    if names is None:
        return None
    return [PerPointParameter(name, param_constraint(name)) for name in names]


per_point_parameters.register = _declared.register


def autonormal_row_names(guide):
    """AutoNormal's per-point parameters of site ``"z"`` (means, scales), or None.

    Only AutoNormal's own reader is known to read exactly these two; a subclass
    that overrides ``_get_loc_and_scale`` (e.g. to share scales) gets None and
    goes through the param store.
    """
    if not _reads_autonormal_rows(guide) or guide.prototype_trace is None:
        return None
    if [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()] != ["z"]:
        return None
    return [param_fullname(guide.locs, "z"), param_fullname(guide.scales, "z")]


per_point_parameters.register(AutoNormal)(autonormal_row_names)


def _reads_autonormal_rows(guide):
    # AutoNormal's own reader, not a subclass's override, reads exactly locs.z and scales.z.
    return type(guide)._get_loc_and_scale is AutoNormal._get_loc_and_scale


def offers_row_access(guide):
    """Whether ``guide``'s reader can take its per-point parameters as batch rows (decidable before it runs)."""
    if isinstance(guide, AutoNormal):
        return _reads_autonormal_rows(guide)
    return (callable(getattr(guide, "per_point_parameters", None))
            or _declared.dispatch(type(guide)) is not _declared.dispatch(object))


def parameter_name(module, name):
    """The param-store name of a PyroModule's parameter ``name``: what ``per_point_parameters()`` returns."""
    return param_fullname(module, name)


class _Rows:
    """The rows one :func:`batch_rows` context provides, and which of them were read."""

    def __init__(self, subsample, rows):
        self.subsample = subsample
        self.rows = rows
        self.read = set()


_ACTIVE = []


@contextlib.contextmanager
def batch_rows(subsample, rows):
    """Within this context, readers get ``rows[name]`` for parameter ``name`` and this ``subsample``.

    :param torch.Tensor subsample: the minibatch's indices (B,), the very tensor passed to the objective.
    :param dict rows: param-store name -> constrained rows (B, ...), in ``subsample``'s order.
    :returns: (as the context's value) the set of names that were read, filled on exit.
    """
    entry = _Rows(subsample, dict(rows))
    _ACTIVE.append(entry)
    try:
        yield entry.read
    finally:
        _ACTIVE.pop()


def substituted_rows(names, subsample):
    """The rows of ``names`` for ``subsample`` from the innermost :func:`batch_rows`, or None.

    A reader calls it before touching the param store. It returns None outside a
    :func:`batch_rows` context and for another batch (a different ``subsample``
    tensor); a context that provides some but not all of ``names`` is an error,
    since mixing row access and full reads would train some rows twice.
    """
    if not _ACTIVE or subsample is None or not names:
        return None
    entry = _ACTIVE[-1]
    if entry.subsample is not subsample and not (entry.subsample.shape == subsample.shape
                                                 and torch.equal(entry.subsample, subsample)):
        return None
    missing = [name for name in names if name not in entry.rows]
    if missing:
        if len(missing) == len(names):
            return None
        raise ValueError(f"batch rows were given for only some of the parameters {list(names)} "
                         f"(missing {missing})")
    entry.read.update(names)
    return [entry.rows[name] for name in names]
