"""Sharded safetensors checkpoints: a ``*.safetensors.index.json`` whose ``weight_map`` names
the shard of every tensor, the shards beside it. Converted shard by shard, each streamed
(see ``safetensors_file``); the new index and shards are written beside the output index
under the same shard names, all or nothing. The library's metadata joins the index's
``metadata`` and every shard's header.
"""
import json
from pathlib import Path

from ..io import check_readable
from . import safetensors_file

NAME = "sharded"
DESCRIPTION = "*.safetensors.index.json"


def matches(path):
    return Path(path).name.lower().endswith(".safetensors.index.json")


def read_index(path):
    """The index as a dict with a ``weight_map``.

    Raises
    ------
    ValueError
        If the file is not JSON or has no ``weight_map`` of tensor -> shard names.
    """
    check_readable(path)
    try:
        index = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"'{path}' is not a valid safetensors index: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"'{path}' is not a safetensors index: it has no 'weight_map' of tensor -> shard names")
    return index


def shard_names(index):
    return sorted(set(index["weight_map"].values()))


def files(path):
    path = Path(path)
    return [path, *(path.parent / name for name in shard_names(read_index(path)))]


def names(path):
    return list(read_index(path)["weight_map"])


def read_headers(path):
    """``{shard name: (shard path, validated header)}``, checked against the index.

    Raises
    ------
    FileNotFoundError
        If a shard is missing.
    ValueError
        If a shard is corrupt, a tensor is stored in two shards, or the index maps a tensor
        to a shard that does not hold it.
    """
    path = Path(path)
    index = read_index(path)
    headers, seen = {}, {}
    for name in shard_names(index):
        shard = path.parent / name
        if not shard.exists():
            raise FileNotFoundError(f"shard '{shard}' listed in '{path}' is missing")
        headers[name] = (shard, safetensors_file.read_header(shard))
        for tensor in headers[name][1][0]:
            if tensor in seen:
                raise ValueError(f"tensor {tensor!r} is in two shards, '{seen[tensor]}' and '{name}'")
            seen[tensor] = name
    missing = [t for t, shard in index["weight_map"].items() if seen.get(t) != shard]
    if missing:
        raise ValueError(f"'{path}' maps {len(missing)} tensor(s) to shards that do not hold them, "
                         f"e.g. {missing[0]!r}")
    return index, headers


def read_tensor(path, key=None):
    """One tensor of a sharded checkpoint, read from its shard."""
    from .torch_file import pick

    index = read_index(path)
    name = pick(list(index["weight_map"]), key, path)
    tensor, _ = safetensors_file.read_tensor(Path(path).parent / index["weight_map"][name], name)
    return tensor, name


write_tensors = None  # a mask is written as one .safetensors (or .npy) file


def output_files(source, output):
    output = Path(output)
    return [output, *(output.parent / name for name in shard_names(read_index(source)))]


def convert(source, output, temporaries, converter, metadata):
    index, headers = read_headers(source)
    converter.begin(sum(len(header[0]) for _, header in headers.values()))
    output = Path(output)
    for name, (shard, header) in headers.items():
        safetensors_file.stream(shard, header, temporaries[output.parent / name], converter, metadata)
    index = {**index, "metadata": {**index.get("metadata", {}), **metadata}}
    Path(temporaries[output]).write_text(json.dumps(index, indent=2))
