"""Reading tensors from ``.npy``, ``.pt`` and ``.safetensors`` files, and writing files
atomically.

Files are never loaded with code execution: ``.npy`` with ``allow_pickle=False``, PyTorch
files with ``torch.load(..., weights_only=True)``. Outputs are written to a temporary file
in the destination directory and renamed into place only once complete.
"""
import contextlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
FORMATS = {".npy": "npy", ".safetensors": "safetensors", **{s: "pt" for s in TORCH_SUFFIXES}}


def file_format(path):
    """``"npy"``, ``"pt"`` or ``"safetensors"``, from the path's suffix.

    Raises
    ------
    ValueError
        If the suffix names none of them.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the format of '{path}' from its suffix; "
                         f"use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def load_tensor(path, key=None):
    """Read one tensor from a file, safely.

    Parameters
    ----------
    path : str or Path
        A ``.npy`` array, a PyTorch file (``.pt``, ``.pth``, ``.bin``: a tensor or a
        possibly nested dict of tensors, e.g. a state dict) or a ``.safetensors`` file.
    key : str, optional
        The tensor's name (nested dict keys joined with dots). Needed when the file holds
        more than one tensor; not allowed for ``.npy``.

    Returns
    -------
    tensor : ndarray (``.npy``) or Tensor
    key : str or None
        The name that was read (None for a bare tensor or ``.npy`` array).

    Raises
    ------
    FileNotFoundError, PermissionError, IsADirectoryError
        If the path cannot be opened.
    ValueError
        If the file is corrupt, holds objects other than tensors, or ``key`` is missing,
        not given where needed, or given for a ``.npy`` file.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npy")
    >>> np.save(path, np.ones((2, 4)))
    >>> load_tensor(path)[0].shape
    (2, 4)
    """
    fmt = file_format(path)
    _check_readable(path)
    if fmt == "npy":
        if key is not None:
            raise ValueError(f"'{path}' is a .npy file holding one array; drop the key {key!r}")
        try:
            return np.load(path, allow_pickle=False), None
        except Exception as exc:  # numpy raises several types for bad files
            raise ValueError(f"cannot read '{path}' as a .npy array: {_first_line(exc)}") from exc
    if fmt == "safetensors":
        return _load_safetensors(path, key)
    tensors = _load_torch(path)
    if not isinstance(tensors, dict):
        if key is not None:
            raise ValueError(f"'{path}' holds a single tensor, not a dict; drop the key {key!r}")
        return tensors, None
    name = _pick(list(tensors), key, path)
    return tensors[name], name


def load_torch_file(path):
    """The object in a PyTorch file, read with ``weights_only=True`` (memory-mapped when the
    file allows it, so tensors are paged in only when used).

    Raises
    ------
    ValueError
        If the file holds objects other than tensors and plain containers, or is corrupt.
    """
    import pickle

    import torch

    _check_readable(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        raise ValueError(f"'{path}' holds objects other than tensors and was refused: it is read "
                         f"with torch.load(weights_only=True), which never runs code from a file "
                         f"({_first_line(exc)})") from exc
    except Exception as exc:
        raise ValueError(f"cannot read '{path}' as a PyTorch file: {_first_line(exc)}") from exc


def _load_torch(path):
    import torch

    obj = load_torch_file(path)
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        tensors = dict(_flatten(obj))
        if tensors:
            return tensors
    raise ValueError(f"'{path}' holds no tensors (found {type(obj).__name__})")


def _flatten(tree, prefix=""):
    import torch

    for name, value in tree.items():
        if isinstance(value, torch.Tensor):
            yield prefix + str(name), value
        elif isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}.")


def _load_safetensors(path, key):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            name = _pick(list(f.keys()), key, path)
            return f.get_tensor(name), name
    except ValueError:
        raise  # ours, from _pick
    except Exception as exc:
        raise ValueError(f"cannot read '{path}' as a safetensors file: {_first_line(exc)}") from exc


def _pick(names, key, path):
    """The tensor name to read: ``key``, or the only name there is."""
    if key is None:
        if len(names) != 1:
            listing = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"'{path}' holds {len(names)} tensors; name one with a key "
                             f"(--key): {listing}")
        return names[0]
    if key not in names:
        close = [n for n in names if key in n or n in key][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {len(names)} tensors"
        raise ValueError(f"key {key!r} is not in '{path}'{hint}")
    return key


def _check_readable(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: '{path}'")
    if path.is_dir():
        raise IsADirectoryError(f"'{path}' is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"'{path}' is not readable (permission denied)")


def _first_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def atomic_output(path, *, force=False):
    """Yield a temporary path beside ``path``; move it onto ``path`` only on success.

    A crash, Ctrl-C or full disk inside the ``with`` block leaves no partial ``path`` and
    no temporary file.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is False.
    FileNotFoundError
        If the directory of ``path`` does not exist.

    Examples
    --------
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "x.txt")
    >>> with atomic_output(out) as tmp:
    ...     _ = open(tmp, "w").write("done")
    >>> open(out).read()
    'done'
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"output '{path}' exists; pass --force (force=True) to replace it, "
                              f"or write elsewhere")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory '{path.parent}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # temp files are 0600; give the output the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(path, tensors, *, metadata=None, force=False):
    """Write named tensors to ``path`` atomically, in the format its suffix names.

    Parameters
    ----------
    path : str or Path
        ``.npy`` (exactly one tensor), ``.pt``/``.pth``/``.bin`` or ``.safetensors``.
    tensors : dict of str to ndarray or Tensor
    metadata : dict of str to str, optional
        Stored in the safetensors header; ignored by the other formats.
    force : bool, default False
        Replace an existing ``path``.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is False.
    ValueError
        If the suffix is unknown, or ``.npy`` is asked to hold several tensors.
    """
    fmt = file_format(path)
    if fmt == "npy" and len(tensors) != 1:
        raise ValueError(f"a .npy file holds one array, got {len(tensors)} tensors for '{path}'")
    with atomic_output(path, force=force) as tmp:
        if fmt == "npy":
            (value,) = tensors.values()
            with open(tmp, "wb") as f:
                np.save(f, _to_numpy(value), allow_pickle=False)
        elif fmt == "pt":
            import torch

            torch.save({k: _to_torch(v) for k, v in tensors.items()}, tmp)
        else:
            from safetensors.torch import save_file

            save_file({k: _to_torch(v).contiguous() for k, v in tensors.items()}, tmp,
                      metadata=metadata)


def _to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _to_torch(x):
    import torch

    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


# ---- safetensors, streamed -------------------------------------------------------------

SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                           "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                           "F64": 8}


def read_safetensors_header(path):
    """The header of a safetensors file, checked against the file's size.

    Returns
    -------
    tensors : dict of str to dict
        ``{name: {"dtype", "shape", "data_offsets"}}`` in file order; offsets are relative to
        ``data_start``.
    metadata : dict of str to str
    data_start : int

    Raises
    ------
    ValueError
        If the file is truncated or its header is corrupt.
    """
    import json

    _check_readable(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"'{path}' is not a safetensors file: only {size} bytes")
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8 or header_size > 100_000_000:
            raise ValueError(f"'{path}' is truncated or not a safetensors file: its header claims "
                             f"{header_size} bytes, the file has {size}")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as exc:
            raise ValueError(f"'{path}' has a corrupt safetensors header: {_first_line(exc)}") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_size
    tensors = dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))
    end = 0
    for name, info in tensors.items():
        begin, stop = info["data_offsets"]
        expected = math.prod(info["shape"]) * SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 0)
        if begin != end or stop - begin != expected:
            raise ValueError(f"'{path}' is corrupt: tensor {name!r} has inconsistent offsets")
        end = stop
    if data_start + end > size:
        raise ValueError(f"'{path}' is truncated: its tensors need {data_start + end} bytes, "
                         f"the file has {size}")
    return tensors, metadata, data_start


def safetensors_header_bytes(tensors, metadata):
    """The 8-byte length and JSON header for ``tensors`` (name -> dtype, shape, offsets),
    padded with spaces so that data starts 8-byte aligned."""
    import json

    header = {"__metadata__": metadata, **tensors} if metadata else dict(tensors)
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    return len(body).to_bytes(8, "little") + body
