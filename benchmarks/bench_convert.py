"""Converting a large checkpoint: time, ratio to a row-wise conversion of the same file
measured in the same run, and peak memory.

Generates a sharded bf16 safetensors checkpoint of a decoder-like model (about 570 M
parameters: an embedding, 32 square 4096x4096 projections, norms), then converts it with
``transposable convert`` to row-wise 2:4 and to transposable 2:4 (exact), each in a fresh
process that reports its own peak resident memory.

Run: python benchmarks/bench_convert.py [--layers 32] [--width 4096] [--dir DIR]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# Peak memory is VmHWM, the high-water mark of this process's own address space:
# ru_maxrss would carry over the parent's peak from before exec.
CONVERT = """
import sys, time
from transposable.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print("SECONDS", time.perf_counter() - start)
with open("/proc/self/status") as f:
    peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print("PEAK_RSS_BYTES", peak_kib * 1024)
sys.exit(code)
"""


def make_checkpoint(folder, layers, width, shards):
    """A sharded bf16 checkpoint; returns (index path, parameters, largest tensor bytes)."""
    generator = torch.Generator().manual_seed(0)
    names = ["embed_tokens.weight"] + [f"layers.{i}.{part}" for i in range(layers // 2)
                                       for part in ("attn.weight", "attn_norm.weight", "mlp.weight", "mlp_norm.weight")]
    shapes = {name: ((2 * width, width) if name.startswith("embed") else (width,) if "norm" in name else (width, width))
              for name in names}
    per_shard = -(-len(names) // shards)
    weight_map, parameters = {}, 0
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {name: (torch.randn(*shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
                   for name in names[s * per_shard:(s + 1) * per_shard]}
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        parameters += sum(t.numel() for t in tensors.values())
        del tensors
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": parameters * 2}, "weight_map": weight_map}))
    return index, parameters, max(2 * w * h for w, h in (s for s in shapes.values() if len(s) == 2))


def convert(index, output, *flags):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CONVERT, "convert", str(index), "-o", str(output),
                             "--pattern", "2:4", "--force", *flags], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr)
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("SECONDS", "PEAK")))
    summary = next(line for line in result.stdout.splitlines() if line.startswith("converted "))
    return time.perf_counter() - start, int(lines["PEAK_RSS_BYTES"]), summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="square projections (default 32)")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        work = Path(work)
        (work / "in").mkdir()
        start = time.perf_counter()
        index, parameters, largest = make_checkpoint(work / "in", args.layers, args.width, args.shards)
        size = sum(p.stat().st_size for p in (work / "in").iterdir())
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
        print(f"checkpoint: {parameters / 1e6:.0f} M parameters, bf16, {args.shards} shards, "
              f"{size / 2**30:.2f} GiB (largest tensor {largest / 2**20:.0f} MiB); made in "
              f"{time.perf_counter() - start:.1f} s")
        (work / "rowwise").mkdir()
        (work / "transposable").mkdir()
        (work / "tiny").mkdir()
        save_file({"w.weight": torch.randn(64, 64).to(torch.bfloat16)}, work / "tiny" / "in.safetensors")
        # The same command on a tiny file: the process's own footprint (torch, numba), and
        # numba's cache warmed for the timed runs.
        baseline = convert(work / "tiny" / "in.safetensors", work / "tiny" / "out.safetensors", "--transposable")[1]
        convert(index, work / "rowwise" / index.name)  # warm the page cache
        rowwise = convert(index, work / "rowwise" / index.name)
        transposable = convert(index, work / "transposable" / index.name, "--transposable")
        print(f"process baseline (same command, tiny file): {baseline / 2**30:.2f} GiB peak RSS")
        print(f"| {'conversion':<28} | {'seconds':>8} | {'× row-wise':>10} | {'peak RSS':>10} | "
              f"{'above baseline':>14} | {'÷ checkpoint':>12} | {'÷ largest tensor':>16} |")
        print(f"|{'-' * 30}|{'-' * 10}|{'-' * 12}|{'-' * 12}|{'-' * 16}|{'-' * 14}|{'-' * 18}|")
        for label, (seconds, peak, summary) in [("row-wise 2:4 (baseline)", rowwise),
                                                 ("transposable 2:4, exact", transposable)]:
            extra = peak - baseline
            print(f"| {label:<28} | {seconds:8.1f} | {seconds / rowwise[0]:10.2f} | {peak / 2**30:6.2f} GiB | "
                  f"{extra / 2**30:10.2f} GiB | {extra / size:12.2f} | {extra / largest:16.1f} |")
        print(f"transposable run: {transposable[2]}")


if __name__ == "__main__":
    main()
