"""Input validation shared by the public functions.

Every check raises a ValueError that names the argument and says what was
expected, so a user sees the problem at the call that caused it.
"""

import math
import numbers
import weakref

import numpy as np
import torch

# Tensors already validated, by id: (weak reference, version counter and shape
# when checked). The finiteness scan is O(N D) and would otherwise run on every
# training step. (WeakKeyDictionary cannot hold tensors: it compares keys with ==.)
_VALIDATED = {}


def check_data(x, name="x", data_dim=None, allow_numpy=False):
    """Return ``x`` as a floating (N, D) tensor with finite entries.

    :param x: the data; a torch.Tensor (or, with ``allow_numpy``, anything
        ``numpy.asarray`` accepts).
    :param str name: the argument's name, for the error message.
    :param int data_dim: the expected D, if known.
    :param bool allow_numpy: convert array-likes instead of rejecting them.
    """
    if not isinstance(x, torch.Tensor):
        if not allow_numpy:
            raise ValueError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
        try:
            array = np.asarray(x)
        except Exception as error:  # noqa: BLE001 - any conversion failure is bad input
            raise ValueError(f"{name} could not be converted to an array: {error}") from error
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
        x = torch.as_tensor(array)
        if not torch.is_floating_point(x):
            x = x.to(torch.get_default_dtype())
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D) = (data points, data dimension), "
                         f"got shape {tuple(x.shape)}")
    if x.size(0) == 0:
        raise ValueError(f"{name} must hold at least one data point, got shape {tuple(x.shape)}")
    if data_dim is not None and x.size(1) != data_dim:
        raise ValueError(f"{name} has data dimension {x.size(1)} but the model expects "
                         f"data_dim = {data_dim} (shape (N, {data_dim}))")
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite, but contains NaN or inf "
                         f"(first at index {tuple(bad)})")
    return x


def check_data_cached(x, name="x", data_dim=None):
    """:func:`check_data` for tensors, with the O(N D) finiteness scan skipped for a tensor
    that passed it before, unchanged.

    In-place changes bump a tensor's version counter and so trigger a new scan; the
    cheap shape checks run every time.
    """
    if not isinstance(x, torch.Tensor):
        return check_data(x, name, data_dim)
    key = (x._version, tuple(x.shape))
    entry = _VALIDATED.get(id(x))
    if entry is not None and entry[0]() is x and entry[1] == key:
        if data_dim is not None and x.size(1) != data_dim:
            check_data(x, name, data_dim)  # raises the shape error
        return x
    check_data(x, name, data_dim)
    identity = id(x)
    _VALIDATED[identity] = (weakref.ref(x, lambda _: _VALIDATED.pop(identity, None)), key)
    return x


def check_int(value, name, minimum=1):
    """Return ``value`` if it is an integer >= ``minimum`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_device(device, name="device"):
    """Return ``device`` as a ``torch.device`` (None stays None) that this machine can compute on.

    Refuses what cannot hold data (``"meta"``) and an accelerator that is not there, before
    anything is trained.
    """
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name} must be a torch device such as 'cpu' or 'cuda', got {device!r}") from error
    if device.type == "meta":
        raise ValueError(f"{name}='meta' holds no values to train on; use 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={str(device)!r}, but torch finds no CUDA device on this machine; use 'cpu'")
    return device


def check_magnitude(x, name="x"):
    """Return ``x`` if its squares neither overflow nor all underflow in its dtype.

    The closed forms sum ||x||^2 over points; data near the dtype's limits (e.g. 1e30 or 1e-30
    in float32) would turn that into inf or 0 deep inside the objective. The model is unit-free
    (:mod:`pyro_esc.model`), so rescaling the data loses nothing.
    """
    finfo = torch.finfo(x.dtype)
    largest = float(x.detach().abs().max()) if x.numel() else 0.0
    # Compared through square roots: largest ** 2 itself can overflow a Python float (1e200 in float64).
    if largest and largest >= math.sqrt(finfo.max / x.numel()):
        raise ValueError(f"{name} is too large for {x.dtype} (largest |entry| {largest:.3g}): sums of squares "
                         f"overflow. Divide it by a constant (e.g. its standard deviation; the model's results "
                         f"scale with it) or use float64")
    if largest and largest <= math.sqrt(finfo.tiny / finfo.eps):
        raise ValueError(f"{name} is too small for {x.dtype} (largest |entry| {largest:.3g}): its squares "
                         f"underflow. Multiply it by a constant (e.g. 1 / its standard deviation; the model's "
                         f"results scale with it) or use float64")
    return x


def check_positive(value, name):
    """Return ``value`` as a float if it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_positive_tensor(value, name, shape, like):
    """Return ``value`` as a tensor of ``shape`` (dtype/device of ``like``), all entries finite and > 0."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0 and shape != ():
        value = value.expand(shape)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_subsample(subsample, size, name="subsample"):
    """Return ``subsample`` as a 1-D long tensor of valid indices into ``size`` points, or None."""
    if subsample is None:
        return None
    if not isinstance(subsample, torch.Tensor):
        subsample = torch.as_tensor(subsample)
    if subsample.dim() != 1 or subsample.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be a 1-D integer tensor of data-point indices, "
                         f"got dtype {subsample.dtype} and shape {tuple(subsample.shape)}")
    if subsample.numel() == 0:
        raise ValueError(f"{name} must select at least one data point")
    if int(subsample.min()) < 0 or int(subsample.max()) >= size:
        raise ValueError(f"{name} must hold indices in [0, {size}), got values in "
                         f"[{int(subsample.min())}, {int(subsample.max())}]")
    return subsample.long()


def check_fields(fields, name):
    """Return a dictionary (D, H) as a finite floating tensor, one field per column.

    Tensors and anything ``numpy.asarray`` accepts are taken (array-likes become float64,
    integer tensors torch's default dtype); the result is detached from the graph.

    :param fields: the dictionary, e.g. generative fields W of shape (D, H).
    :param str name: the argument's name, for the error message.
    """
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
