"""Time and quality of every transposable-mask method, against baselines measured in the
same run.

For each pattern and square fp32 Gaussian weight it prints, per method: median seconds,
microseconds per m x m tile, the time as a multiple of the row-wise ``torch.topk`` mask
(the floor: what a non-transposable mask costs), and the kept L1 as a fraction of the exact
optimum. The second baseline is OR-Tools solving one tile per call, the way the reference
implementation works; it is timed on a sample of tiles and extrapolated.

Run: python benchmarks/bench_masks.py [--shapes 1024 4096] [--patterns 2:4 4:8 8:16]
"""
import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from ortools.graph.python import min_cost_flow

import solvers
import transposable as tp
from transposable.masks import resolve_method


def median_seconds(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def topk_mask(weight, n, m):
    """Row-wise N:M via torch.topk: the baseline every transposable method is held to."""
    groups = weight.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    return keep.scatter_(1, groups.topk(n, dim=1).indices, True).reshape(weight.shape)


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


def bench(size, pattern, repeat, sample):
    n, m = pattern
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((size, size), dtype=np.float32))
    tiles = size * size // (m * m)
    rows = []

    floor, _ = median_seconds(lambda: topk_mask(weight, n, m), repeat)
    rows.append(("row-wise torch.topk (baseline)", floor, None))
    ours, _ = median_seconds(lambda: tp.nm_mask(weight, pattern), repeat)
    rows.append(("row-wise nm_mask", ours, None))

    masks = {}
    for name in sorted(solvers.TRANSPOSABLE):
        if solvers.TRANSPOSABLE[name].supports(n, m):
            continue
        seconds, masks[name] = median_seconds(
            lambda: tp.transposable_mask(weight, pattern, method=name), repeat)
        rows.append((name, seconds, masks[name]))
    auto = resolve_method("auto", tp.parse_pattern(pattern))
    rows = [(f"{label} (auto)" if label == auto else label, s, mask) for label, s, mask in rows]

    sample_tiles = rng.standard_normal((sample, m, m))
    per_tile = ortools_per_tile_seconds(sample_tiles, n)
    rows.append((f"OR-Tools one tile per call (baseline, {sample} tiles)", per_tile * tiles, None))

    optimum = masks["mincostflow"]
    print(f"\n{pattern[0]}:{pattern[1]}  {size}x{size}  ({tiles} tiles)")
    print(f"| {'method':<44} | {'seconds':>8} | {'µs/tile':>8} | {'× topk':>8} | {'kept L1 / optimum':>17} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 19}|")
    for label, seconds, mask in rows:
        quality = f"{tp.ratio_to_optimum(weight, mask, optimum):.5f}" if mask is not None else "-"
        print(f"| {label:<44} | {seconds:8.3f} | {seconds / tiles * 1e6:8.2f} | "
              f"{seconds / floor:8.1f} | {quality:>17} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8", "8:16"])
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing; the median is shown")
    parser.add_argument("--sample", type=int, default=2000, help="tiles for the one-tile-per-call baseline")
    args = parser.parse_args()

    import numba

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} "
          f"({numba.get_num_threads()} threads); medians of {args.repeat} runs")
    tp.transposable_mask(np.ones((16, 16), np.float32), "4:8", method="greedy")  # numba compile
    for pattern in args.patterns:
        for size in args.shapes:
            bench(size, tuple(tp.parse_pattern(pattern)), args.repeat, args.sample)


if __name__ == "__main__":
    main()
