"""Single ``.safetensors`` files, converted as a stream: the header first, then one tensor at
a time read with plain reads, converted or copied byte for byte, and written.

The header is validated against the file before anything is read, so a truncated file or a
malformed header is one clear error. The library's metadata goes into ``__metadata__``.
"""
import json
import math
import os
from pathlib import Path

from ..io import check_readable, first_line

NAME = "safetensors"
DESCRIPTION = ".safetensors"

#: Bits per element of every dtype safetensors knows (F4 and F6 pack several per byte).
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}

#: torch's names of the dtypes read as tensors.
TORCH_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
                "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

#: The dtypes converted (masks are solved for floating-point weights only).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

#: A header larger than this is refused (safetensors' own limit).
MAX_HEADER_BYTES = 100_000_000


def matches(path):
    name = Path(path).name.lower()
    return name.endswith(".safetensors") and not name.endswith(".safetensors.index.json")


def files(path):
    return [Path(path)]


def read_header(path):
    """The validated header of a safetensors file.

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
        If the file is truncated, its header is not valid JSON, not an object of tensor
        entries (each with a known ``dtype``, a ``shape`` of sizes and two ``data_offsets``),
        or the entries do not tile the data section.
    """
    check_readable(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"'{path}' is not a safetensors file: only {size} bytes")
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8 or header_size > MAX_HEADER_BYTES:
            raise ValueError(f"'{path}' is truncated or not a safetensors file: its header claims "
                             f"{header_size} bytes, the file has {size}")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as exc:
            raise ValueError(f"'{path}' has a corrupt safetensors header: {first_line(exc)}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"'{path}' has a corrupt safetensors header: a JSON {type(header).__name__} "
                         f"where an object of tensors belongs")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"'{path}' has a corrupt safetensors header: __metadata__ must map names to strings")
    for name, info in header.items():
        problem = _entry_problem(info)
        if problem:
            raise ValueError(f"'{path}' has a corrupt safetensors header: tensor {name!r} {problem}")
    tensors = dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))
    end = 0
    for name, info in tensors.items():
        begin, stop = info["data_offsets"]
        bits = math.prod(info["shape"]) * DTYPE_BITS[info["dtype"]]
        if begin != end or bits % 8 or stop - begin != bits // 8:
            raise ValueError(f"'{path}' is corrupt: tensor {name!r} ({info['dtype']}, shape {info['shape']}) "
                             f"does not fit its data_offsets {info['data_offsets']}")
        end = stop
    data_start = 8 + header_size
    if data_start + end > size:
        raise ValueError(f"'{path}' is truncated: its tensors need {data_start + end} bytes, the file has {size}")
    return tensors, metadata, data_start


def _entry_problem(info):
    """Why a header entry is malformed, or None."""
    if not isinstance(info, dict):
        return f"is a JSON {type(info).__name__}, not an object"
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        return f"has no {', '.join(missing)}"
    if info["dtype"] not in DTYPE_BITS:
        return f"has an unknown dtype {info['dtype']!r}"
    if not (isinstance(info["shape"], list) and all(_count(s) for s in info["shape"])):
        return f"has a shape that is not a list of sizes: {info['shape']!r}"
    offsets = info["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        return f"has data_offsets that are not two byte positions: {offsets!r}"
    return None


def _count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def names(path):
    return list(read_header(path)[0])


def read_tensor(path, key=None):
    """One tensor of a safetensors file (header validated first)."""
    from safetensors import safe_open

    from .torch_file import pick

    tensors, _, _ = read_header(path)
    name = pick(list(tensors), key, path)
    try:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name), name
    except Exception as exc:
        raise ValueError(f"cannot read '{path}' as a safetensors file: {first_line(exc)}") from exc


def write_tensors(path, tensors, metadata=None):
    """Named tensors (NumPy or torch) into a safetensors file, with ``metadata``."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    save_file({k: (v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))).contiguous()
               for k, v in tensors.items()}, path, metadata=metadata or None)


def header_bytes(tensors, metadata):
    """The 8-byte length and JSON header for ``tensors`` (name -> dtype, shape, offsets),
    padded with spaces so that data starts 8-byte aligned."""
    header = {"__metadata__": metadata, **tensors} if metadata else dict(tensors)
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    return len(body).to_bytes(8, "little") + body


def output_files(source, output):
    return [Path(output)]


def convert(source, output, temporaries, converter, metadata):
    header = read_header(source)
    converter.begin(len(header[0]))
    stream(source, header, temporaries[Path(output)], converter, metadata)


def stream(source, header, destination, converter, metadata):
    """Write the converted copy of one safetensors file, one tensor at a time.

    Tensors are read with plain reads, not a memory map: mapped pages stay resident as they
    are touched, so peak memory would grow to the whole file.
    """
    import torch

    tensors, file_metadata, data_start = header
    with open(destination, "wb") as out, open(source, "rb") as raw:
        out.write(header_bytes(tensors, {**file_metadata, **metadata}))
        for name, info in tensors.items():
            begin, end = info["data_offsets"]
            if converter.wants(name, tuple(info["shape"]), info["dtype"].lower(), info["dtype"] in FLOAT_DTYPES):
                tensor = read_entry(raw, data_start, info, source)
                out.write(converter(name, tensor).contiguous().view(torch.uint8).numpy().tobytes())
            else:
                raw.seek(data_start + begin)
                _copy(raw, out, end - begin, source)


def read_entry(raw, data_start, info, path):
    """The tensor of one header entry, read with a plain read from the open file ``raw``.

    Raises
    ------
    ValueError
        If the file ends early, or the dtype has no torch equivalent here.
    """
    import torch

    dtype = getattr(torch, TORCH_DTYPES.get(info["dtype"], ""), None)
    if dtype is None:
        raise ValueError(f"'{path}': tensors of dtype {info['dtype']} cannot be read as torch tensors here")
    begin, end = info["data_offsets"]
    raw.seek(data_start + begin)
    data = bytearray(end - begin)
    if raw.readinto(data) != len(data):
        raise ValueError(f"'{path}' ended early: it is truncated")
    return torch.frombuffer(data, dtype=dtype).reshape(info["shape"]) if data else torch.empty(info["shape"],
                                                                                               dtype=dtype)


def _copy(source, destination, count, path, chunk=1 << 24):
    while count:
        data = source.read(min(chunk, count))
        if not data:
            raise ValueError(f"'{path}' ended early: it is truncated")
        destination.write(data)
        count -= len(data)
