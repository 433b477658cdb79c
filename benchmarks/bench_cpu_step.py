"""A sparsified training step on the CPU against the dense one, and what a refresh costs.

For each model (a 3-layer 1024-wide MLP at batch 256, and a small MLP at batch 32) it
trains a dense copy and a ``sparsify``-ed copy (SR-STE, the default) with SGD, one step
each in turn, and prints the median wall time of a step (forward, backward, optimizer; no
refresh) and the ratio sparse / dense, in wall time and in process CPU time, for 2:4
row-wise, 2:4 transposable and 4:8 transposable masks. Then the median time of one ``MaskRefresher.refresh()`` of the
whole model, which happens every step (row-wise) or every 40 steps (transposable), so the
amortized refresh cost per step is beside it.

One torch thread. Both clocks are shown because they part once numba's parallel solver has
run in the process (the transposable rows: ``sparsify`` solves the first masks with it):
its idle worker thread then spins inside the OpenMP runtime it shares with torch, and the
process's CPU time grows at the same wall time (up to 2x for a dense step; setting
``OMP_WAIT_POLICY=PASSIVE`` or ``NUMBA_THREADING_LAYER=workqueue`` before starting removes
most of it). The wall-time ratio is what the masking costs.

Run: python benchmarks/bench_cpu_step.py [--rounds 30]
"""
import argparse
import copy
import os
import platform
import statistics
import time

import torch
from torch import nn

from transposable.nn import MaskRefresher, sparsify

MODELS = {
    "MLP 1024x3, batch 256": (lambda: nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                                    nn.ReLU(), nn.Linear(1024, 1024)), 256, 1024),
    "MLP 64-256-256-16, batch 32": (lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256),
                                                          nn.ReLU(), nn.Linear(256, 16)), 32, 64),
}
SETTINGS = [("2:4", False), ("2:4", True), ("4:8", True)]


def stepper(model, batch, features):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, features)
    target = torch.randn(batch, model[-1].out_features)

    def step():
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()

    return step


def seconds(fn):
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread, "
          f"torch {torch.__version__}; medians over {args.rounds} interleaved rounds")
    print("| model | masks | dense step (ms) | sparse step (ms) | sparse / dense (wall) | sparse / dense (CPU) | "
          "refresh (ms) | refresh per step (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (make, batch, features) in MODELS.items():
        torch.manual_seed(0)
        dense = make()
        for pattern, transposable in SETTINGS:
            sparse = sparsify(copy.deepcopy(dense), pattern, transposable=transposable)
            steps = [stepper(dense, batch, features), stepper(sparse, batch, features)]
            for step in steps:  # warm up: allocator, first-call paths
                step(), step()
            times = [[], []]
            for _ in range(args.rounds):
                for which, step in enumerate(steps):
                    times[which].append(seconds(step))
            refresher = MaskRefresher(sparse)
            refresh = statistics.median(seconds(refresher.refresh)[0] for _ in range(max(3, args.rounds // 6)))
            every = 40 if transposable else 1
            (d, d_cpu), (s, s_cpu) = ([statistics.median(c) * 1e3 for c in zip(*t)] for t in times)
            kind = "transposable" if transposable else "row-wise"
            print(f"| {label} | {pattern} {kind} | {d:.2f} | {s:.2f} | {s / d:.2f} | {s_cpu / d_cpu:.2f} | "
                  f"{refresh * 1e3:.1f} | {refresh * 1e3 / every:.2f} |", flush=True)


if __name__ == "__main__":
    main()
