"""NumPy ``.npy`` files: one array, read without pickle; no metadata, no checkpoints."""
from pathlib import Path

import numpy as np

from ..io import check_readable, first_line

NAME = "npy"
DESCRIPTION = ".npy"


def matches(path):
    return Path(path).suffix.lower() == ".npy"


def files(path):
    return [Path(path)]


def names(path):
    return [""]  # one unnamed array


def read_tensor(path, key=None):
    """The array in a ``.npy`` file (``allow_pickle=False``), in native byte order.

    Raises
    ------
    ValueError
        If the file is not a plain ``.npy`` array, or a key is given.
    """
    check_readable(path)
    if key is not None:
        raise ValueError(f"'{path}' is a .npy file holding one array; drop the key {key!r}")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # NumPy raises several types for bad files
        raise ValueError(f"cannot read '{path}' as a .npy array: {first_line(exc)}") from exc
    if not array.dtype.isnative:  # written on a machine of the other byte order
        array = array.astype(array.dtype.newbyteorder("="))
    return array, None


def write_tensors(path, tensors, metadata=None):
    """Write the one tensor of ``tensors`` (NumPy or torch) as ``.npy``; ``metadata`` is not
    kept (the format has none)."""
    if len(tensors) != 1:
        raise ValueError(f"a .npy file holds one array, got {len(tensors)} tensors")
    (value,) = tensors.values()
    array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


output_files = None
convert = None
