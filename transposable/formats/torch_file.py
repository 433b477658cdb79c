"""PyTorch files (``.pt``, ``.pth``, ``.bin``): a tensor or a (nested) state dict, read with
``torch.load(weights_only=True)`` so that no code in the file ever runs.

The library's metadata rides in the state dict's ``_metadata["transposable"]``, where
``load_state_dict`` (which reads module entries only) ignores it.
"""
import collections
import re
from pathlib import Path

from ..io import check_readable, first_line

NAME = "pt"
DESCRIPTION = ".pt/.pth/.bin"
SUFFIXES = (".pt", ".pth", ".bin")


def matches(path):
    return Path(path).suffix.lower() in SUFFIXES


def files(path):
    return [Path(path)]


def load(path):
    """The object in a PyTorch file, read with ``weights_only=True`` (memory-mapped when the
    file allows it, so tensors are paged in only when used).

    Raises
    ------
    ValueError
        If the file holds objects other than tensors and plain containers, or is corrupt.
    """
    import pickle

    import torch

    check_readable(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(exc))  # torch >= 2.4, older
        what = f" (found {found.group(1)})" if found else ""
        raise ValueError(f"'{path}' holds Python objects other than tensors{what}, refused: loading with "
                         f"weights_only=True never runs code from a file; save tensors only (a state dict or "
                         f".safetensors)") from exc
    except Exception as exc:
        raise ValueError(f"cannot read '{path}' as a PyTorch file: {first_line(exc)}") from exc


def names(path):
    import torch

    obj = load(path)
    return [""] if isinstance(obj, torch.Tensor) else [name for name, _ in flatten(obj)] if isinstance(obj, dict) else []


def read_tensor(path, key=None):
    """One tensor of a PyTorch file; nested dict keys are joined with dots."""
    import torch

    obj = load(path)
    if isinstance(obj, torch.Tensor):
        if key is not None:
            raise ValueError(f"'{path}' holds a single tensor, not a dict; drop the key {key!r}")
        return obj, None
    tensors = dict(flatten(obj)) if isinstance(obj, dict) else {}
    if not tensors:
        raise ValueError(f"'{path}' holds no tensors (found {type(obj).__name__})")
    name = pick(list(tensors), key, path)
    return tensors[name], name


def write_tensors(path, tensors, metadata=None):
    """``torch.save`` a state dict of ``tensors`` (NumPy or torch), metadata in ``_metadata``."""
    import numpy as np
    import torch

    state = collections.OrderedDict(
        (k, v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)))
        for k, v in tensors.items())
    if metadata:
        state._metadata = collections.OrderedDict(transposable=dict(metadata))
    torch.save(state, path)


def output_files(source, output):
    return [Path(output)]


def convert(source, output, temporaries, converter, metadata):
    """Load the file, pass every tensor through ``converter`` keeping the structure (nested
    dicts, their types, module metadata), and save it."""
    import torch

    obj = load(source)
    converter.begin(sum(1 for _ in _tensors_in(obj)))

    def walk(node, prefix):
        if isinstance(node, torch.Tensor):
            name = prefix.rstrip(".")
            if converter.wants(name, tuple(node.shape), str(node.dtype).replace("torch.", ""),
                               node.is_floating_point()):
                return converter(name, node)
            return node
        if isinstance(node, dict):
            converted = type(node)((key, walk(value, f"{prefix}{key}.")) for key, value in node.items())
            if hasattr(node, "_metadata"):
                converted._metadata = node._metadata
            return converted
        return node

    converted = walk(obj, "")
    if isinstance(converted, dict):
        if not hasattr(converted, "_metadata"):
            converted = collections.OrderedDict(converted)
            converted._metadata = collections.OrderedDict()
        converted._metadata["transposable"] = dict(metadata)
    torch.save(converted, temporaries[Path(output)])


def pick(names, key, path):
    """The tensor name to read: ``key``, or the only name there is."""
    if key is None:
        if len(names) != 1:
            listing = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"'{path}' holds {len(names)} tensors; name one with a key (--key): {listing}")
        return names[0]
    if key not in names:
        close = [n for n in names if key in n or n in key][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {len(names)} tensors"
        raise ValueError(f"key {key!r} is not in '{path}'{hint}")
    return key


def flatten(tree, prefix=""):
    """Every tensor of a nested state dict, with its dotted name.

    Parameters
    ----------
    tree : dict
        Tensors and dicts of them (what ``torch.save`` of a state dict, or of a dict of
        state dicts, holds).
    prefix : str, optional
        Put before every name.

    Yields
    ------
    (str, Tensor)
        ``("model.layers.0.weight", tensor)``, in the dicts' order.

    Examples
    --------
    >>> import torch
    >>> [name for name, _ in flatten({"model": {"w": torch.zeros(1)}, "b": torch.zeros(1)})]
    ['model.w', 'b']
    """
    import torch

    for name, value in tree.items():
        if isinstance(value, torch.Tensor):
            yield prefix + str(name), value
        elif isinstance(value, dict):
            yield from flatten(value, f"{prefix}{name}.")


def _tensors_in(node):
    import torch

    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _tensors_in(value)
