"""Transposable masks solved on the weight's own device: seconds and kept L1 against the
exact optimum, beside the row-wise ``torch.topk`` mask on the same device in the same run.

For each dtype (float32, bfloat16) and each (pattern, method) — 2:4 ``exhaustive``, 4:8 and
8:16 ``cyclecanceling`` (exact) and ``greedy`` — on a square Gaussian weight (8192 x 8192 on
a GPU): the median seconds of the whole mask (CUDA events on a GPU; the solver's own
synchronisation included), the ratio to the row-wise ``torch.topk`` N:M mask, and the kept
L1 as a fraction of the exact optimum (the CPU's ``cyclecanceling`` mask of the same
weight). Without CUDA it runs small on the CPU, to check the code.

Run: python benchmarks/bench_gpu_masks.py [--size 8192] [--repeat 5] [--json FILE]
"""
import argparse
import json
import statistics
import sys
import time

import torch

import transposable as tp

CASES = [("2:4", "exhaustive"), ("4:8", "cyclecanceling"), ("4:8", "greedy"), ("8:16", "cyclecanceling"),
         ("8:16", "greedy")]


def median_seconds(fn, repeat, device):
    fn()  # warm up: compilation, allocator
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def topk_mask(weight, n, m):
    """Row-wise N:M by ``torch.topk`` over groups of M: the floor of any mask's cost."""
    groups = weight.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(weight.shape)


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192 if cuda else 512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results here (after every row)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name}, {args.size} x {args.size} Gaussian weights, medians of {args.repeat}")
    print("| dtype | pattern | method | ms | × topk | topk ms | kept L1 / optimum |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        host = torch.randn(args.size, args.size, generator=generator).to(dtype)
        weight = host.to(device)
        optima = {}
        for pattern, method in CASES:
            n, m = (int(v) for v in pattern.split(":"))
            if pattern not in optima:  # exact, on the CPU, in float64 on the same (rounded) values
                optima[pattern] = tp.mask(host.double(), pattern, transposable=True, method="cyclecanceling")
            topk = median_seconds(lambda: topk_mask(weight, n, m), args.repeat, device)
            seconds = median_seconds(lambda: tp.mask(weight, pattern, transposable=True, method=method),
                                     args.repeat, device)
            found = tp.mask(weight, pattern, transposable=True, method=method)
            if not tp.is_transposable_nm(found.cpu(), pattern):
                raise RuntimeError(f"{method} {pattern} on {name} returned an invalid mask")
            ratio = tp.ratio_to_optimum(host.double(), found.cpu(), optima[pattern])
            row = {"dtype": str(dtype).replace("torch.", ""), "pattern": pattern, "method": method,
                   "seconds": seconds, "topk_seconds": topk, "ratio_to_optimum": ratio}
            rows.append(row)
            print(f"| {row['dtype']} | {pattern} | {method} | {seconds * 1e3:.2f} | {seconds / topk:.1f} | "
                  f"{topk * 1e3:.3f} | {ratio:.5f} |", flush=True)
            if args.json:  # after every row: a part stopped at its time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"device": name, "size": args.size, "rows": rows}, f, indent=2)
    targets = [("2:4 exact <= 1 ms", [r for r in rows if r["pattern"] == "2:4"], lambda r: r["seconds"] <= 1e-3),
               ("8:16 >= 0.999 of the optimum in <= 0.12 s",
                [r for r in rows if r["pattern"] == "8:16"],
                lambda r: r["seconds"] <= 0.12 and r["ratio_to_optimum"] >= 0.999)]
    print("\n| target | rows meeting it |")
    print("|---|---|")
    for label, candidates, ok in targets:
        met = [f"{r['dtype']} {r['method']}" for r in candidates if ok(r)]
        print(f"| {label} | {', '.join(met) or 'none'} |")
    if not cuda:
        print("(no CUDA device: a small run on the CPU, to check the code; the targets are for a GPU)")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
