"""Time, quality and memory of every mask method, against baselines measured in the same run.

For each pattern and square fp32 Gaussian weight, one table: each method's CPU time on one
thread (numba and torch both set to one thread; best of ``--repeat`` runs, the methods
interleaved) as a multiple of the two row-wise baselines, ``torch.topk`` (what a
non-transposable mask costs in plain torch) and our row-wise kernel (``nm_mask``); its wall
time on ``--threads`` threads; and the kept L1 as a fraction of the exact optimum (the
``mincostflow`` mask). "OR-Tools one tile per call" is the reference implementation's way,
timed on a sample of tiles and extrapolated. Then: the first call of each method in a fresh
process with an empty numba cache (compiling) and with a warm one, peak extra memory per
method (fresh processes), time per tile from 256² to 8192², a real trained layer, and the
targets with the measured values. The GPU solvers: ``bench_gpu_masks.py``.

Run: python benchmarks/bench_masks.py [--shapes 1024 4096] [--patterns 2:4 4:8 8:16 16:32]
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

import numba
import numpy as np
import torch
from ortools.graph.python import min_cost_flow

import transposable as tp
from transposable import solvers
from transposable.masks import resolve_method

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.safetensors"
TOPK = "row-wise torch.topk (baseline)"
ROWWISE = "row-wise nm_mask (baseline 2)"


def topk_mask(weight, n, m):
    """Row-wise N:M via torch.topk: the baseline every method is held to."""
    groups = weight.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    return keep.scatter_(1, groups.topk(n, dim=1).indices, True).reshape(weight.shape)


def set_threads(count):
    torch.set_num_threads(count)
    numba.set_num_threads(count)


def contenders(pattern, methods=None):
    """{label: function of the weight}: the two row-wise baselines, then every engine that
    supports the pattern (or only ``methods``)."""
    n, m = pattern
    table = {TOPK: lambda w: topk_mask(w, n, m), ROWWISE: lambda w: tp.nm_mask(w, pattern)}
    for name in sorted(solvers.TRANSPOSABLE):
        if solvers.TRANSPOSABLE[name].supports(n, m) is None and (methods is None or name in methods):
            table[name] = lambda w, name=name: tp.transposable_mask(w, pattern, method=name)
    return table


def best_times(functions, weight, repeat, threads, clock):
    """Best time of each function over ``repeat`` interleaved rounds, on ``threads``
    threads; the slow OR-Tools reference runs once. Returns ({label: s}, {label: mask})."""
    set_threads(threads)
    times, masks = {}, {}
    for round_ in range(repeat):
        for label, function in functions.items():
            if label == "mincostflow" and round_:
                continue
            start = clock()
            masks[label] = function(weight)
            times[label] = min(times.get(label, np.inf), clock() - start)
    return times, masks


def ortools_per_tile_seconds(tiles, n):
    """Seconds per tile when every tile is its own OR-Tools problem."""
    m = tiles.shape[1]
    tails = np.repeat(np.arange(m, dtype=np.int32), m)
    heads = np.tile(np.arange(m, 2 * m, dtype=np.int32), m)
    supplies = np.repeat(np.array([n, -n], dtype=np.int64), m)
    nodes = np.arange(2 * m, dtype=np.int32)
    start = time.perf_counter()
    for tile in tiles:
        flow = min_cost_flow.SimpleMinCostFlow()
        costs = -np.rint(np.abs(tile) / np.abs(tile).max() * solvers.mincostflow.COST_SCALE).astype(np.int64)
        flow.add_arcs_with_capacity_and_unit_cost(tails, heads, np.ones(m * m, dtype=np.int64), costs.ravel())
        flow.set_nodes_supplies(nodes, supplies)
        if flow.solve() != flow.OPTIMAL:
            raise RuntimeError("OR-Tools did not reach optimality")
    return (time.perf_counter() - start) / len(tiles)


def bench(weight, pattern, repeat, threads, sample, title):
    """One table; returns {label: {"cpu": s, "wall": s, "quality": ratio or None}}."""
    n, m = pattern
    tiles = weight.numel() // (m * m)
    functions = contenders(pattern)
    cpu, masks = best_times(functions, weight, repeat, 1, time.process_time)
    wall, _ = best_times(functions, weight, repeat, threads, time.perf_counter)
    optimum = masks["mincostflow"]
    auto = resolve_method("auto", tp.parse_pattern(pattern))
    print(f"\n{title}  ({tiles} tiles)")
    print(f"| {'method':<44} | {'CPU s, 1 thread':>15} | {'× topk':>7} | {'× nm_mask':>9} | "
          f"{f'wall s, {threads} threads':>19} | {'kept L1 / optimum':>17} |")
    print(f"|{'-' * 46}|{'-' * 17}|{'-' * 9}|{'-' * 11}|{'-' * 21}|{'-' * 19}|")
    results = {}
    for label in functions:
        quality = tp.ratio_to_optimum(weight, masks[label], optimum) if label in solvers.TRANSPOSABLE else None
        results[label] = {"cpu": cpu[label], "wall": wall[label], "quality": quality}
        shown = f"{quality:.5f}" if quality is not None else "-"
        name = f"{label} (auto)" if label == auto else label
        print(f"| {name:<44} | {cpu[label]:15.3f} | {cpu[label] / cpu[TOPK]:7.2f} | {cpu[label] / cpu[ROWWISE]:9.2f} | "
              f"{wall[label]:19.3f} | {shown:>17} |")
    if sample:
        one_tile = ortools_per_tile_seconds(np.random.default_rng(1).standard_normal((sample, m, m)), n) * tiles
        label = f"OR-Tools one tile per call ({sample} tiles)"
        results[label] = {"cpu": one_tile, "wall": one_tile, "quality": None}
        print(f"| {label:<44} | {one_tile:15.3f} | {one_tile / cpu[TOPK]:7.2f} | {one_tile / cpu[ROWWISE]:9.2f} | "
              f"{'':>19} | {'-':>17} |")
    return results


FIRST_CALL = """
import json, sys, time
import numpy as np, transposable as tp
weight = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
seconds = []
for pattern in sys.argv[2:]:
    begin = time.process_time()
    if sys.argv[1] == "rowwise":
        tp.nm_mask(weight, pattern)
    else:
        tp.transposable_mask(weight, pattern, method=sys.argv[1])
    seconds.append(time.process_time() - begin)
print(json.dumps({"calls": seconds}))
"""


def first_calls(method, patterns):
    """CPU seconds of a fresh process's calls of ``method`` on ``patterns`` in turn, first
    with an empty numba cache (compiling), then with the cache that run left."""
    with tempfile.TemporaryDirectory() as cache:
        environment = {**os.environ, "NUMBA_CACHE_DIR": cache}
        runs = [json.loads(subprocess.run([sys.executable, "-c", FIRST_CALL, method, *patterns], env=environment,
                                          capture_output=True, text=True, check=True).stdout) for _ in range(2)]
    return [run["calls"] for run in runs]


MEMORY_PROBE = """
import json, os, sys, threading, time, numpy as np, torch, transposable as tp
size, pattern, method = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, sys.argv[4])
from bench_masks import topk_mask
n, m = tp.parse_pattern(pattern)
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
def solve(weight):
    if method == "topk":
        return topk_mask(weight, n, m)
    if method == "rowwise":
        return tp.nm_mask(weight, pattern)
    return tp.transposable_mask(weight, pattern, method=method)
solve(torch.ones(64, 64))   # load compiled code first
weight = torch.from_numpy(np.random.default_rng(0).standard_normal((size, size), dtype=np.float32))
before, peak, running = rss(), [0], [True]
def watch():  # current RSS every millisecond: ru_maxrss is already high from start-up
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
watcher = threading.Thread(target=watch)
watcher.start()
mask = solve(weight)
running[0] = False
watcher.join()
print(json.dumps({"extra_bytes": max(peak[0], rss()) - before, "weight_bytes": weight.numel() * 4}))
"""


def peak_extra_memory(size, pattern, method):
    """Peak RSS growth while solving (the mask included), in a fresh process, as a
    multiple of the weight's size."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(size), pattern, method, str(Path(__file__).parent)],
                         capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout)
    return probe["extra_bytes"] / probe["weight_bytes"]


def scaling(sizes, cases, repeat):
    """CPU seconds per tile, one thread, of each (pattern, method) at each size."""
    rng = np.random.default_rng(2)
    table = {}
    for size in sizes:
        weight = torch.from_numpy(rng.standard_normal((size, size), dtype=np.float32))
        for pattern, method in cases:
            n, m = tp.parse_pattern(pattern)
            functions = {method: contenders((n, m), [method])[ROWWISE if method == "rowwise" else method]}
            cpu, _ = best_times(functions, weight, repeat, 1, time.process_time)
            table[pattern, method, size] = cpu[method] / (size * size / (m * m))
    return table


def main(argv=None):
    threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        return run(argv)
    finally:  # the timings set both libraries' thread counts; a caller gets its own back
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])


def run(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8", "8:16", "16:32"])
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing; the best is shown")
    parser.add_argument("--threads", type=int, default=2, help="threads for the wall-time column")
    parser.add_argument("--sample", type=int, default=2000, help="tiles for the one-tile-per-call baseline")
    parser.add_argument("--scaling", type=int, nargs="*", default=[256, 1024, 4096, 8192],
                        help="sizes for the time-per-tile table (none: skip it)")
    parser.add_argument("--first-calls", nargs="*", default=["rowwise", "exhaustive", "greedy", "cyclecanceling"],
                        help="methods whose first call is timed in fresh processes (none: skip)")
    parser.add_argument("--memory", nargs="*", default=["topk:4:8", "rowwise:2:4", "rowwise:16:32", "exhaustive:2:4",
                                                        "greedy:4:8", "greedy:16:32", "cyclecanceling:4:8",
                                                        "cyclecanceling:16:32", "mincostflow:4:8"],
                        help="METHOD:N:M cases whose peak memory is measured (none: skip)")
    args = parser.parse_args(argv)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, numba {numba.__version__}; CPU time on 1 thread (numba and torch), "
          f"wall time on {args.threads}; best of {args.repeat} runs")
    for pattern in args.patterns:  # compile (or load numba's cache) outside the timings
        for function in contenders(tuple(tp.parse_pattern(pattern))).values():
            function(torch.ones(64, 64))
    rng = np.random.default_rng(0)
    results = {}
    for pattern in args.patterns:
        for size in args.shapes:
            weight = torch.from_numpy(rng.standard_normal((size, size), dtype=np.float32))
            results[pattern, size] = bench(weight, tuple(tp.parse_pattern(pattern)), args.repeat, args.threads,
                                           args.sample, f"{pattern}  {size}x{size}  fp32 Gaussian")

    from safetensors.torch import load_file

    trained = load_file(EXAMPLE)["fc2.weight"]
    for pattern in ("2:4", "4:8", "8:16"):
        bench(trained, tuple(tp.parse_pattern(pattern)), args.repeat, args.threads, 0,
              f"{pattern}  real trained layer: digits MLP fc2.weight {tuple(trained.shape)}")

    calls = {}
    if args.first_calls:
        print("\nFirst calls in a fresh process (CPU s, numba's import included): empty cache (compiling) / warm cache")
        print("| method | patterns | empty cache | warm cache |")
        print("|---|---|---|---|")
        for method in args.first_calls:
            patterns = ["2:4", "1:4"] if method in ("rowwise", "exhaustive") else ["4:8", "16:32"]
            calls[method] = first_calls(method, patterns)
            cold, warm = calls[method]
            print(f"| {method} | {' then '.join(patterns)} | {' + '.join(f'{s:.2f}' for s in cold)} | "
                  f"{' + '.join(f'{s:.2f}' for s in warm)} |")

    memory = {}
    big = max(args.shapes)
    if args.memory:
        print(f"\nPeak extra memory while solving {big}x{big} fp32 (fresh process; × the weight's bytes)")
        print("| method | pattern | peak extra |")
        print("|---|---|---|")
        for case in args.memory:
            method, pattern = case.split(":", 1)
            memory[method, pattern] = peak_extra_memory(big, pattern, method)
            print(f"| {method} | {pattern} | {memory[method, pattern]:.2f}× |")

    per_tile = {}
    cases = [("2:4", "rowwise"), ("2:4", "exhaustive"), ("8:16", "greedy"), ("8:16", "cyclecanceling")]
    if args.scaling:
        per_tile = scaling(args.scaling, cases, max(1, args.repeat // 2))
        print("\nCPU µs per tile, 1 thread, by size (linear scaling: a flat row)")
        print("| pattern | method | " + " | ".join(f"{s}²" for s in args.scaling) + " |")
        print("|---|---|" + "---|" * len(args.scaling))
        for pattern, method in cases:
            print(f"| {pattern} | {method} | " + " | ".join(f"{per_tile[pattern, method, s] * 1e6:.3f}"
                                                          for s in args.scaling) + " |")

    print(f"\nTargets ({big}x{big} fp32 Gaussian, CPU time on 1 thread; ratios from the tables above)")
    print("| target | measured | met |")
    print("|---|---|---|")

    def row(text, value, ok):
        print(f"| {text} | {value} | {'yes' if ok else 'no'} |")

    def ratio(pattern, label, baseline=TOPK):
        table = results[pattern, big]
        return table[label]["cpu"] / table[baseline]["cpu"]

    measured = [p for p in args.patterns if (p, big) in results]
    if measured:
        worst = max(measured, key=lambda p: ratio(p, ROWWISE))
        rowwise_memory = max((v for (method, _), v in memory.items() if method == "rowwise"), default=None)
        shown = f", {rowwise_memory:.2f}× extra memory" if rowwise_memory is not None else ""
        row("row-wise kernel ≤ 0.5× topk at ≤ 0.25× extra memory",
            f"{ratio(worst, ROWWISE):.2f}× (worst, {worst}){shown}",
            ratio(worst, ROWWISE) <= 0.5 and (rowwise_memory is None or rowwise_memory <= 0.26))
    limits = {"2:4": ("exhaustive", 0.6), "4:8": ("cyclecanceling", 2), "8:16": ("cyclecanceling", 3),
              "16:32": ("cyclecanceling", 5)}
    for pattern in measured:
        if pattern in limits:
            method, limit = limits[pattern]
            r = ratio(pattern, method)
            row(f"exact {pattern} ({method}) ≤ {limit}× topk", f"{r:.2f}×", r <= limit)
    for pattern in measured:
        r, quality = ratio(pattern, "greedy"), results[pattern, big]["greedy"]["quality"]
        row(f"greedy {pattern} ≤ 1.5× topk, kept L1 ≥ 0.997", f"{r:.2f}×, {quality:.4f}", r <= 1.5 and quality >= 0.997)
    for method, (cold, _) in calls.items():
        row(f"first call of {method}, empty cache, ≤ 5 s CPU", f"{cold[0]:.2f} s (next pattern {cold[1]:.2f} s)",
            cold[0] <= 5)
    if per_tile:
        large = [s for s in args.scaling if s >= 1024] or args.scaling  # below, fixed costs per call show
        for pattern, method in cases:
            spread = max(per_tile[pattern, method, s] for s in large) / min(per_tile[pattern, method, s] for s in large)
            row(f"linear scaling, {pattern} {method} (µs per tile, largest / smallest from 1024²)", f"{spread:.2f}",
                spread <= 1.3)
    if "4:8" in measured:
        table = results["4:8", big]
        speedup = table["cyclecanceling"]["cpu"] / table["cyclecanceling"]["wall"]
        row(f"{args.threads} threads ≥ 1.7× faster than 1 (exact 4:8, CPU s → wall s)",
            f"{speedup:.2f}× ({table['cyclecanceling']['cpu']:.2f} s → {table['cyclecanceling']['wall']:.2f} s)",
            speedup >= 1.7)
        one_tile = next(v for k, v in table.items() if k.startswith("OR-Tools one tile"))["cpu"] if args.sample else None
        row("exact 4:8 against OR-Tools (batched; one tile per call)",
            f"{table['mincostflow']['cpu'] / table['cyclecanceling']['cpu']:.1f}×"
            + (f"; {one_tile / table['cyclecanceling']['cpu']:.1f}×" if one_tile else ""), True)
    return {"tables": results, "first_calls": calls, "memory": memory, "per_tile": per_tile}


if __name__ == "__main__":
    main()
