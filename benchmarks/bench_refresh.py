"""What a mask refresh costs, before and after refreshes learned to keep the better mask per tile.

A refresh used to be one solve (the greedy, for transposable masks) copied into the mask.
Now it also compares, per tile, the kept ``|W|`` of the current and the new mask and keeps
the better (``better_mask``). For one layer per shape and pattern, on weights that training
has moved (the current mask is the exact mask of the weights before a perturbation), it
prints the median seconds of the solve alone (the refresh before), of ``better_mask``
(what was added), of a whole ``MaskRefresher.refresh`` (the refresh now), and the ratio of
the refresh now to the solve, all in the same run.

Run: python benchmarks/bench_refresh.py [--repeat 5]
"""
import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from transposable.nn import MaskRefresher, sparsify

SHAPES = [(1024, 1024), (4096, 4096), (11008, 4096)]
PATTERNS = ["2:4", "4:8", "8:16"]


def median_seconds(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); fp32 Gaussian weights, medians of {args.repeat}")
    print("| layer (out x in) | pattern | solve (before) s | better_mask s | refresh (now) s | now / before | "
          "flips kept out |")
    print("|---|---|---|---|---|---|---|")
    for out, inp in SHAPES:
        for pattern in PATTERNS:
            torch.manual_seed(0)
            layer = sparsify(nn.Linear(inp, out, bias=False), pattern, refresh_method="greedy")
            with torch.no_grad():
                layer.weight.add_(0.05 * layer.weight.std() * torch.randn_like(layer.weight))  # a few steps of training
            current = layer.mask.clone()
            refresher = MaskRefresher(layer)
            solve = median_seconds(lambda: layer.solve_mask("greedy"), args.repeat)
            candidate = layer.solve_mask("greedy")
            better = median_seconds(lambda: layer.better_mask(candidate), args.repeat)

            def refresh():
                layer.mask.copy_(current)
                refresher.refresh()

            whole = median_seconds(refresh, args.repeat)
            greedy_flips = int((candidate != current).sum())
            flips = refresher.history[-1]["total"]["flips"]
            print(f"| {out} x {inp} | {pattern} | {solve:.3f} | {better:.3f} | {whole:.3f} | {whole / solve:.2f} | "
                  f"{greedy_flips - flips} of {greedy_flips} |", flush=True)


if __name__ == "__main__":
    main()
