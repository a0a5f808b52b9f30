"""Reading files that run no code: the one ``torch.load`` call of the package's file formats."""

import torch

__all__ = ["load_error_summary", "read_plain"]


def load_error_summary(error):
    """The first line of a load error, without torch's advice to retry with ``weights_only=False``.

    That advice is exactly what must not be followed for a file from elsewhere: a pickle can run code.
    """
    text = str(error).strip().splitlines()
    if not text or "weights_only" in str(error):
        return f"{type(error).__name__}: it holds something other than tensors and plain values"
    return f"{type(error).__name__}: {text[0]}"


def read_plain(source, map_location=None):
    """``torch.load(source, weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only.

    :raises FileNotFoundError: as ``open`` does.
    :raises ValueError: for anything unreadable, naming the cause (never a pickled object run).
    """
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to read means: not a file of ours
        raise ValueError(load_error_summary(error)) from None
