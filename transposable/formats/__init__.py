"""File formats behind one registry: read a tensor, write tensors, convert a checkpoint.

Every format is one module with the same names:

``NAME``, ``DESCRIPTION``
    Its registry key, and how to name such a path in a message (``".npy"``).
``matches(path) -> bool``
    Whether a path names a file of this format (by its name alone).
``files(path) -> list of Path``
    The files ``path`` stands for (a sharded index: the index and its shards).
``names(path) -> list of str``
    The tensor names a checkpoint holds, read without loading the tensors where the
    format allows.
``read_tensor(path, key) -> (tensor, name)``
    One tensor, read safely: never by executing code from the file.
``write_tensors(path, tensors, metadata)``, or ``None``
    Named tensors (and the library's metadata, where the format keeps metadata) into a
    new file at ``path`` (a temporary from :func:`transposable.io.atomic_outputs`).
``output_files(source, output) -> list of Path``, or ``None``
    The files converting the checkpoint ``source`` to ``output`` writes.
``convert(source, output, temporaries, converter, metadata)``, or ``None``
    Stream a checkpoint through ``converter`` (see :class:`transposable.convert.Converter`)
    into ``temporaries`` (``{output file: temporary file}``); ``None`` for formats that do
    not hold checkpoints.

Adding a format is one new module with these names and one line in ``FORMATS``; the
``solve`` and ``convert`` commands, the report and the safety checks then handle it.
"""
from . import npy, safetensors_file, safetensors_sharded, torch_file

#: Formats by name, in the order :func:`format_of` tries them (the most specific first).
FORMATS = {
    "sharded": safetensors_sharded,
    "safetensors": safetensors_file,
    "pt": torch_file,
    "npy": npy,
}


def format_of(path):
    """The format module for ``path``, from its name.

    Parameters
    ----------
    path : str or Path
        Judged by its name alone (the file need not exist).

    Returns
    -------
    module
        One of ``FORMATS.values()``.

    Raises
    ------
    ValueError
        If no format matches the name.

    Examples
    --------
    >>> format_of("model.safetensors.index.json").NAME, format_of("w.PT").NAME
    ('sharded', 'pt')
    """
    for fmt in FORMATS.values():
        if fmt.matches(path):
            return fmt
    names = ", ".join(fmt.DESCRIPTION for fmt in FORMATS.values())
    raise ValueError(f"cannot tell the format of '{path}' from its name; use one of {names}")


def find_checkpoint(model_dir):
    """The checkpoint file of a model folder and the format module that reads it.

    A sharded index, a ``.safetensors`` file, or a PyTorch file (``pytorch_model.bin``).

    Parameters
    ----------
    model_dir : str or Path
        The folder.

    Returns
    -------
    (Path, module)
        The checkpoint path and its format.

    Raises
    ------
    FileNotFoundError
        If the folder or its ``config.json`` is missing, or it holds no checkpoint.
    NotADirectoryError
        If ``model_dir`` is a file.
    ValueError
        If it holds several checkpoints of different kinds.

    Examples
    --------
    >>> find_checkpoint("/nowhere")
    Traceback (most recent call last):
    ...
    FileNotFoundError: model folder '/nowhere' does not exist
    """
    from pathlib import Path

    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise NotADirectoryError(f"'{model_dir}' is a file, not a model folder; give the folder that holds "
                                 "config.json, the tokenizer and the weights")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder '{model_dir}' does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"'{model_dir}' has no config.json: give a Hugging Face model folder")
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    for kind in ("sharded", "safetensors", "pt"):
        found = [p for p in files if FORMATS[kind].matches(p)]
        if kind == "pt":
            found = [p for p in found if p.name.startswith("pytorch_model")]
        if len(found) == 1:
            return found[0], FORMATS[kind]
        if len(found) > 1:
            raise ValueError(f"'{model_dir}' holds {len(found)} {FORMATS[kind].DESCRIPTION} checkpoints "
                             f"({', '.join(p.name for p in found[:3])}); keep one")
    raise FileNotFoundError(f"'{model_dir}' holds no model.safetensors, *.safetensors.index.json or "
                            f"pytorch_model.bin")


def mask_metadata(pattern, transposable, method):
    """The metadata every output of the library records (one schema for all commands).

    Parameters
    ----------
    pattern : str or Pattern
        The N:M pattern.
    transposable : bool
        Whether the masks are transposable.
    method : str
        The resolved solver name (``"rowwise"`` for row-wise masks).

    Returns
    -------
    dict of str to str
        ``transposable.pattern``, ``.transposable``, ``.method`` and ``.version``.

    Examples
    --------
    >>> mask_metadata("2:4", True, "exhaustive")["transposable.pattern"]
    '2:4'
    """
    from .. import __version__

    return {"transposable.pattern": str(pattern), "transposable.transposable": str(bool(transposable)).lower(),
            "transposable.method": method, "transposable.version": __version__}


def read_tensor(path, key=None):
    """One tensor from a file of any registered format, read safely.

    Parameters
    ----------
    path : str or Path
        A file of a registered format.
    key : str, optional
        The tensor's name (nested dict keys joined with dots); needed when the file holds
        more than one, refused for ``.npy``.

    Returns
    -------
    tensor : ndarray (``.npy``) or Tensor
        The tensor, on the CPU.
    name : str or None
        The name that was read (None for a bare tensor or a ``.npy`` array).

    Raises
    ------
    FileNotFoundError, PermissionError, IsADirectoryError
        If the path cannot be opened.
    ValueError
        If the format is unknown, the file is corrupt or holds objects other than tensors,
        or ``key`` is missing, not given where needed, or given for a ``.npy`` file.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npy")
    >>> np.save(path, np.ones((2, 4)))
    >>> read_tensor(path)[0].shape
    (2, 4)
    """
    return format_of(path).read_tensor(path, key)


def write_tensors(path, tensors, *, metadata=None, force=False):
    """Write named tensors to ``path`` atomically, in the format its name gives.

    Parameters
    ----------
    path : str or Path
        ``.npy`` (exactly one tensor), ``.pt``/``.pth``/``.bin`` or ``.safetensors``.
    tensors : dict of str to ndarray or Tensor
        Names and values.
    metadata : dict of str to str, optional
        Kept where the format keeps metadata (safetensors header, state dict ``_metadata``).
    force : bool, default False
        Replace an existing ``path``.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is False.
    ValueError
        If the format is unknown or cannot hold these tensors.
    OSError
        If the file cannot be written (named, with the reason).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> write_tensors(path, {"mask": np.eye(4, dtype=bool)}, metadata={"note": "x"})
    >>> read_tensor(path)[0].sum().item()
    4
    """
    from ..io import atomic_output

    fmt = format_of(path)
    if fmt.write_tensors is None:
        raise ValueError(f"'{path}': a {fmt.DESCRIPTION} is not written directly; write .safetensors or .npy")
    if fmt is npy and len(tensors) != 1:
        raise ValueError(f"a .npy file holds one array, got {len(tensors)} tensors for '{path}'")
    with atomic_output(path, force=force) as tmp:
        fmt.write_tensors(tmp, tensors, metadata)
