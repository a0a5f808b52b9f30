"""Row access to per-point parameters: what makes a minibatch step cost O(batch).

A per-point guide (one Gaussian per data point: :class:`~pyro_esc.guides.LocalMultivariateNormal`,
Pyro's ``AutoNormal``) keeps its parameters as (N, ...) tensors in Pyro's param
store. Read the usual way, a minibatch evaluation constrains all N rows
(``pyro.param``), slices the batch, and its backward pass writes a dense (N, ...)
gradient that an optimiser then applies to every row: O(N) work per step for
O(B) information, and Adam's momentum keeps moving points that were not in the
batch.

The row-wise route of :func:`~pyro_esc.fit` (:class:`~pyro_esc.rowwise.RowwiseStep`)
instead takes the batch's rows itself and hands them to the guide as an argument:

- :func:`per_point_parameters` names a guide's per-point parameters (param-store
  names, each with its constraint); guides declare them with a method
  ``per_point_parameters()`` returning param-store names (:func:`parameter_name`),
  or a function registered with ``per_point_parameters.register(GuideClass)``;
- :func:`rows_posterior` turns the batch's rows of those parameters (constrained,
  in that order) into the batch's :class:`~pyro_esc.GaussianPosterior`; guides
  declare it with a method ``posterior_from_rows(rows)``, or a function registered
  with ``rows_posterior.register(GuideClass)``. The objective then evaluates that
  posterior (:meth:`~pyro_esc.EntropyELBO.evaluate`'s ``posterior``): nothing O(N)
  is read, and the gradient reaches the rows only.

Nothing here changes a parameter: the step that owns the rows writes them back.
"""

import functools
from typing import NamedTuple


from pyro.infer.autoguide import AutoNormal

from .._pyro_internals import param_constraint, param_fullname

__all__ = ["PerPointParameter", "autonormal_row_names", "offers_row_access", "parameter_name",
           "per_point_parameters", "rows_posterior"]


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
    """Whether ``guide`` names its per-point parameters and builds a batch's posterior from their rows
    (decidable before it runs)."""
    if isinstance(guide, AutoNormal):
        return _reads_autonormal_rows(guide)
    names_rows = (callable(getattr(guide, "per_point_parameters", None))
                  or _declared.dispatch(type(guide)) is not _declared.dispatch(object))
    builds_posterior = (callable(getattr(guide, "posterior_from_rows", None))
                        or rows_posterior.dispatch(type(guide)) is not rows_posterior.dispatch(object))
    return names_rows and builds_posterior


def parameter_name(module, name):
    """The param-store name of a PyroModule's parameter ``name``: what ``per_point_parameters()`` returns."""
    return param_fullname(module, name)


@functools.singledispatch
def rows_posterior(guide, rows):
    """The batch's :class:`~pyro_esc.GaussianPosterior` from its rows of the guide's per-point parameters.

    :param list rows: the constrained rows (B, ...) of :func:`per_point_parameters`, in that order.
    :raises ValueError: for a guide that declares no ``posterior_from_rows`` (and has no registered function).
    """
    method = getattr(guide, "posterior_from_rows", None)
    if not callable(method):
        raise ValueError(f"{type(guide).__name__} declares per-point parameters but no posterior_from_rows(rows) "
                         f"(pyro_esc.rows): the row-wise route cannot build its batch's posterior; use "
                         f"optimizer='svi' for this guide")
    return method(rows)
