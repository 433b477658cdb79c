"""Convert trained checkpoints to N:M or transposable N:M, streaming and safely.

Formats: PyTorch files (``.pt``, ``.pth``, ``.bin``; read with ``weights_only=True``),
single safetensors files, and sharded safetensors (``*.safetensors.index.json`` with its
shards). The output keeps the input's format, sharding, tensor names, dtypes and metadata;
tensors that are not converted are copied byte for byte. Safetensors are streamed: one
tensor at a time is read, masked and written, so memory stays near the largest tensor.
"""
import contextlib
import fnmatch
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .io import (
    atomic_output,
    file_format,
    load_torch_file,
    read_safetensors_header,
    safetensors_header_bytes,
)
from .masks import kept_fraction, nm_mask, resolve_method, transposable_mask
from .patterns import parse_pattern

#: Tensors never converted unless ``include`` names them: embeddings, norms, biases.
DEFAULT_EXCLUDE = ("*embed*", "*wte*", "*wpe*", "*norm*", "*ln_*", "*.ln*", "*bias")

@dataclass
class TensorReport:
    """What happened to one tensor."""

    name: str
    shape: list
    dtype: str
    status: str  # "converted", "skipped: ...", or "left dense: ..."
    density: float = None  # non-zero fraction before
    kept_l1: float = None  # kept |w| / total |w|
    nonzeros_kept: float = None  # fraction of the original non-zeros still kept
    seconds: float = None


@dataclass
class ConversionReport:
    """Per-tensor results and a summary of one conversion."""

    input: str
    output: str
    pattern: str
    transposable: bool
    method: str
    version: str = __version__
    tensors: list = field(default_factory=list)

    def summary(self):
        converted = [t for t in self.tensors if t.status == "converted"]
        weights = sum(math.prod(t.shape) for t in converted)
        return {
            "tensors": len(self.tensors),
            "converted": len(converted),
            "left_dense": sum(t.status.startswith("left dense") for t in self.tensors),
            "skipped": sum(t.status.startswith("skipped") for t in self.tensors),
            "converted_weights": weights,
            "kept_l1": (sum(t.kept_l1 * math.prod(t.shape) for t in converted) / weights) if weights else None,
            "seconds": sum(t.seconds for t in converted),
        }

    def to_json(self):
        return json.dumps({**asdict(self), "summary": self.summary()}, indent=2)


def convert_checkpoint(source, output, pattern, *, transposable=False, method="auto", include=(),
                       exclude=(), pad=False, force=False, progress=False):
    """Write an N:M (or transposable N:M) copy of a checkpoint.

    Parameters
    ----------
    source : str or Path
        A ``.pt``/``.pth``/``.bin`` file, a ``.safetensors`` file, or a sharded
        checkpoint's ``*.safetensors.index.json`` (its shards beside it).
    output : str or Path
        Where to write, in the same format: a file of the same kind, or for a sharded
        checkpoint the new index path (shards are written beside it, same file names).
    pattern : str or tuple
        ``"2:4"`` etc.: N kept of every M along each weight's input dimension.
    transposable : bool, default False
        Make every mask transposable too (M x M tiles over ``(out, in)``).
    method : str, default "auto"
        Transposable solver, as in :func:`transposable.transposable_mask`.
    include, exclude : sequence of str
        Glob patterns on tensor names. By default every floating tensor with at least 2
        dimensions is converted except names matching ``DEFAULT_EXCLUDE`` (embeddings,
        norms, biases); ``include`` limits conversion to matching names, ``exclude`` adds
        to the exclusions.
    pad : bool, default False
        Pad weights whose dimensions are not multiples of M; otherwise they are reported and
        left dense.
    force : bool, default False
        Replace existing output files. The input is never overwritten.
    progress : bool, default False
        Show a progress bar over tensors (stderr).

    Returns
    -------
    ConversionReport

    Raises
    ------
    FileExistsError
        If an output exists and ``force`` is False.
    ValueError
        For a bad pattern or method, an output of another format or equal to the input, a
        corrupt or truncated file, a missing shard, or a tensor name found twice.

    Notes
    -----
    Masks follow the library's axis convention (groups along ``in``, tiles over ``(out,
    in)`` per kernel tap). Pruned weights become exact zeros in the tensor's own dtype.
    Outputs are written to temporary files beside their destination and renamed only when
    everything is written, so an error or Ctrl-C leaves no partial output.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> torch.save({"fc.weight": torch.randn(8, 8), "fc.bias": torch.zeros(8)}, os.path.join(folder, "m.pt"))
    >>> report = convert_checkpoint(os.path.join(folder, "m.pt"), os.path.join(folder, "m24.pt"), "2:4")
    >>> [t.status for t in report.tensors]
    ['converted', 'skipped: 1-D']
    """
    pattern = parse_pattern(pattern)
    method = resolve_method(method, pattern) if transposable else "rowwise"
    source, output = Path(source), Path(output)
    kind = _kind(source)
    if kind == "npy":
        raise ValueError(f"'{source}' is a .npy array, not a checkpoint; convert takes .pt/.pth/.bin, "
                         f".safetensors or a *.safetensors.index.json (transposable solve masks one array)")
    if _kind(output) != kind:
        raise ValueError(f"output '{output}' must be of the input's kind ({_describe(kind)})")
    report = ConversionReport(str(source), str(output), str(pattern), transposable, method)
    options = dict(pattern=pattern, transposable=transposable, method=method, pad=pad,
                   include=tuple(include), exclude=DEFAULT_EXCLUDE + tuple(exclude))
    metadata = {"transposable.pattern": str(pattern), "transposable.transposable": str(transposable).lower(),
                "transposable.method": method, "transposable.version": __version__}
    if kind == "sharded":
        _convert_sharded(source, output, options, metadata, report, force, progress)
    elif kind == "safetensors":
        _refuse_input_as_output(output, [source])
        tensors, file_metadata, data_start = read_safetensors_header(source)
        with _progress(len(tensors), progress) as bar, atomic_output(output, force=force) as tmp:
            _convert_safetensors_file(source, tensors, file_metadata, data_start, tmp, options,
                                      metadata, report, bar)
    else:
        _refuse_input_as_output(output, [source])
        _convert_torch_file(source, output, options, metadata, report, force, progress)
    return report


def select(name, shape, is_float, include, exclude):
    """``None`` if the tensor is to be converted, else why not. A name matched by
    ``include`` is exempt from the default exclusions (not from the caller's)."""
    included = any(fnmatch.fnmatchcase(name, glob) for glob in include)
    if include and not included:
        return "not included"
    if not is_float:
        return "not floating point"
    if len(shape) < 2:
        return f"{len(shape)}-D"
    if math.prod(shape) == 0:
        return "empty"
    for glob in exclude:
        if fnmatch.fnmatchcase(name, glob) and not (included and glob in DEFAULT_EXCLUDE):
            return f"excluded by {glob}"
    return None


def _skip(name, shape, dtype, reason, report):
    report.tensors.append(TensorReport(name, list(shape), dtype, f"skipped: {reason}"))


def _convert_tensor(name, tensor, options, report):
    """The masked tensor to write (a selected one), with its report entry appended."""
    shape, dtype = list(tensor.shape), str(tensor.dtype).replace("torch.", "")
    start = time.perf_counter()
    try:
        if options["transposable"]:
            mask = transposable_mask(tensor, options["pattern"], method=options["method"], pad=options["pad"])
        else:
            mask = nm_mask(tensor, options["pattern"], pad=options["pad"])
    except ValueError as exc:
        if "not a multiple of" not in str(exc):
            raise ValueError(f"tensor {name!r}: {exc}") from exc
        report.tensors.append(TensorReport(name, shape, dtype, f"left dense: {str(exc).split(';')[0]}"))
        return tensor
    seconds = time.perf_counter() - start
    nonzero = tensor != 0
    nonzeros = int(nonzero.sum())
    report.tensors.append(TensorReport(
        name, shape, dtype, "converted", density=nonzeros / tensor.numel(),
        kept_l1=kept_fraction(tensor, mask),
        nonzeros_kept=int((nonzero & mask).sum()) / nonzeros if nonzeros else 1.0, seconds=seconds))
    return torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype))  # +0.0, never -0.0


_TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _convert_safetensors_file(source, tensors, file_metadata, data_start, destination, options, metadata,
                              report, bar):
    # Tensors are read with plain reads, not a memory map: mapped pages stay resident as
    # they are touched, so peak memory would grow to the whole file.
    with open(destination, "wb") as out, open(source, "rb") as raw:
        out.write(safetensors_header_bytes(tensors, {**file_metadata, **metadata}))
        for name, info in tensors.items():
            begin, end = info["data_offsets"]
            raw.seek(data_start + begin)
            reason = select(name, info["shape"], info["dtype"] in _TORCH_DTYPES, options["include"],
                            options["exclude"])
            if reason is None:
                data = bytearray(end - begin)
                if raw.readinto(data) != len(data):
                    raise ValueError(f"'{source}' ended early: it is truncated")
                tensor = torch.frombuffer(data, dtype=_TORCH_DTYPES[info["dtype"]]).reshape(info["shape"])
                converted = _convert_tensor(name, tensor, options, report)
                out.write(converted.contiguous().view(torch.uint8).numpy().tobytes())
            else:  # copied byte for byte
                _skip(name, info["shape"], info["dtype"].lower(), reason, report)
                _copy(raw, out, end - begin)
            bar.update()


def _copy(source, destination, count, chunk=1 << 24):
    while count:
        data = source.read(min(chunk, count))
        if not data:
            raise ValueError(f"'{source.name}' ended early: it is truncated")
        destination.write(data)
        count -= len(data)


def _convert_sharded(index_path, output, options, metadata, report, force, progress):
    index = _read_index(index_path)
    shard_names = sorted(set(index["weight_map"].values()))
    shards = [index_path.parent / name for name in shard_names]
    _refuse_input_as_output(output, [index_path, *shards])
    headers, seen = {}, {}
    for name, path in zip(shard_names, shards):
        if not path.exists():
            raise FileNotFoundError(f"shard '{path}' listed in '{index_path}' is missing")
        headers[name] = read_safetensors_header(path)
        for tensor in headers[name][0]:
            if tensor in seen:
                raise ValueError(f"tensor {tensor!r} is in two shards, '{seen[tensor]}' and '{name}'")
            seen[tensor] = name
    missing = [t for t, shard in index["weight_map"].items() if seen.get(t) != shard]
    if missing:
        raise ValueError(f"'{index_path}' maps {len(missing)} tensor(s) to shards that do not hold them, "
                         f"e.g. {missing[0]!r}")
    for name in shard_names:
        _refuse_input_as_output(output.parent / name, [index_path, *shards])
    total = sum(len(h[0]) for h in headers.values())
    with contextlib.ExitStack() as stack:  # all or nothing: renamed together at the end
        index_tmp = stack.enter_context(atomic_output(output, force=force))
        targets = {name: stack.enter_context(atomic_output(output.parent / name, force=force))
                   for name in shard_names}
        bar = stack.enter_context(_progress(total, progress))
        for name, path in zip(shard_names, shards):
            tensors, file_metadata, data_start = headers[name]
            _convert_safetensors_file(path, tensors, file_metadata, data_start, targets[name], options,
                                      metadata, report, bar)
        index = {**index, "metadata": {**index.get("metadata", {}), **metadata}}
        Path(index_tmp).write_text(json.dumps(index, indent=2))


def _read_index(path):
    from .io import _check_readable

    _check_readable(path)
    try:
        index = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"'{path}' is not a valid safetensors index: {exc}") from exc
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ValueError(f"'{path}' is not a safetensors index: it has no 'weight_map'")
    return index


def _convert_torch_file(source, output, options, metadata, report, force, progress):
    import collections

    obj = load_torch_file(source)
    count = sum(1 for _ in _tensors_in(obj))
    with _progress(count, progress) as bar:
        def walk(node, prefix):
            if isinstance(node, torch.Tensor):
                bar.update()
                name = prefix.rstrip(".")
                reason = select(name, node.shape, node.is_floating_point(), options["include"], options["exclude"])
                if reason is None:
                    return _convert_tensor(name, node, options, report)
                _skip(name, node.shape, str(node.dtype).replace("torch.", ""), reason, report)
                return node
            if isinstance(node, dict):
                converted = type(node)((key, walk(value, f"{prefix}{key}.")) for key, value in node.items())
                if hasattr(node, "_metadata"):
                    converted._metadata = node._metadata
                return converted
            return node

        converted = walk(obj, "")
    if isinstance(converted, dict):
        # State dicts carry module metadata in OrderedDict._metadata; load_state_dict only
        # reads entries named after modules, so ours rides along without a stray key.
        converted = collections.OrderedDict(converted) if not hasattr(converted, "_metadata") else converted
        converted._metadata = getattr(converted, "_metadata", collections.OrderedDict())
        converted._metadata["transposable"] = metadata
    with atomic_output(output, force=force) as tmp:
        torch.save(converted, tmp)


def _tensors_in(node):
    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _tensors_in(value)


def _kind(path):
    name = Path(path).name
    if name.endswith(".safetensors.index.json"):
        return "sharded"
    return file_format(path)


def _describe(kind):
    return {"sharded": "a *.safetensors.index.json", "safetensors": ".safetensors", "pt": ".pt, .pth or .bin",
            "npy": ".npy"}[kind]


def _refuse_input_as_output(output, inputs):
    target = Path(output).resolve()
    for path in inputs:
        if Path(path).resolve() == target:
            raise ValueError(f"output '{output}' is an input file; inputs are never overwritten")


@contextlib.contextmanager
def _progress(total, enabled):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tensor", disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()
