"""Linear-layer GEMMs on a GPU: dense vs transposable 2:4 on sparse tensor cores (bf16).

For each shape (tokens x in -> out), with CUDA events (medians after warm-up), dense
``F.linear`` against a ``sparsify``-ed layer whose forward and dX GEMMs run on
``to_sparse_semi_structured`` weights (dW stays dense, so the ideal forward + backward
speed-up is 1.5x):

- ``forward``: ``X W^T``;
- ``dX``: ``dY W``;
- ``apply+compress``: the per-step cost of a training step's new weights: ``W*S`` and its
  transpose compressed (what happens once per optimizer step);
- ``forward+backward``: the whole layer, weights unchanged since the last step;
- ``step``: forward + backward *including* apply+compress, as in training, where every
  optimizer step changes the weights;
- ``fwd+bwd autocast``: forward + backward of float32 master weights under bf16 autocast
  (mixed-precision training), against ``nn.Linear`` under the same autocast.

Prints ratios (dense ms / sparse ms), the device and versions, and whether forward+backward
meets the target (>= 1.3x dense at 4096 wide); exits with a message on machines without CUDA.

Run: python benchmarks/bench_gemm.py [--repeat 50] [--shapes 8192x4096x4096 ...] [--json FILE]
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from transposable.nn import sparsify

#: (tokens, in, out): LLaMA-7B's MLP and attention projections, and a 2048 -> 8192 MLP.
SHAPES = [(tokens, inp, out) for tokens in (8192, 16384)
          for inp, out in ((4096, 11008), (11008, 4096), (4096, 4096), (2048, 8192))]

#: forward+backward of a 4096-wide layer (4096 in or out) against dense, at least.
TARGET = 1.3


def shape(text):
    """``TOKENSxINxOUT`` -> (tokens, in, out)."""
    try:
        tokens, inp, out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is TOKENSxINxOUT, e.g. 8192x4096x4096, got {text!r}") from None
    return tokens, inp, out


def time_ms(fn, repeat):
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(tokens, inp, out, repeat):
    torch.manual_seed(0)
    dense = nn.Linear(inp, out, bias=False).cuda().to(torch.bfloat16)
    sparse = sparsify(nn.Linear(inp, out, bias=False).cuda().to(torch.bfloat16), "2:4")
    kernels = sparse._sparse_kernels()
    if kernels is None:
        raise RuntimeError(f"the sparse path is not available for {inp}->{out}; see the log")
    x = torch.randn(tokens, inp, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)
    masked = (sparse.weight * sparse.mask).detach()

    def new_weights():  # what an optimizer step does to the layer: a new weight version
        with torch.no_grad():
            sparse.weight.add_(0)

    def sparse_step():
        new_weights()
        sparse(x).backward(grad)

    def compress():
        new_weights()
        kernels.update(sparse.weight, sparse.mask)

    # Mixed precision: float32 master weights, GEMMs in bf16 under autocast.
    dense32 = nn.Linear(inp, out, bias=False).cuda()
    sparse32 = sparsify(nn.Linear(inp, out, bias=False).cuda(), "2:4")
    x32 = x.detach().float().requires_grad_(True)

    def under_autocast(layer):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x32)
            out.backward(grad)
        return run

    rows = {
        "forward": (lambda: F.linear(x, dense.weight), lambda: kernels.forward(x)),
        "dX": (lambda: grad @ masked, lambda: kernels.input_grad(grad)),
        "apply+compress": (None, compress),
        "forward+backward": (lambda: dense(x).backward(grad), lambda: sparse(x).backward(grad)),
        "step": (lambda: dense(x).backward(grad), sparse_step),
        "fwd+bwd autocast": (under_autocast(dense32), under_autocast(sparse32)),
    }
    results = []
    for name, (dense_fn, sparse_fn) in rows.items():
        d = time_ms(dense_fn, repeat) if dense_fn is not None else None
        s = time_ms(sparse_fn, repeat)
        results.append({"tokens": tokens, "in": inp, "out": out, "gemm": name, "dense_ms": d, "sparse_ms": s,
                        "speedup": d / s if d else None})
        dense_text = f"{d:9.3f}" if d is not None else f"{'-':>9}"
        ratio = f"{d / s:6.2f}×" if d is not None else f"{'-':>7}"
        print(f"| {tokens}x{inp}->{out} | {name:<16} | {dense_text} | {s:9.3f} | {ratio} |", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--shapes", nargs="+", type=shape, default=SHAPES, metavar="TOKENSxINxOUT",
                        help="layer shapes (default: 8 LLaMA-7B-like shapes at 8192 and 16384 tokens)")
    parser.add_argument("--json", help="also write the results here (after every shape)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemm.py needs a CUDA GPU (Ampere or newer); none is available here", file=sys.stderr)
        return None
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuSPARSELt {cusparselt}, bf16, medians of {args.repeat}")
    print("| shape (tokens x in -> out) | GEMM | dense ms | 2:4 ms | speed-up |")
    print("|---|---|---|---|---|")
    results = []
    for tokens, inp, out in args.shapes:
        results += bench(tokens, inp, out, args.repeat)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "cusparselt": cusparselt, "rows": results}, f, indent=2)
    wide = [r["speedup"] for r in results if r["gemm"] == "forward+backward" and 4096 in (r["in"], r["out"])]
    if wide:
        print(f"forward+backward at 4096 wide: {min(wide):.2f}-{max(wide):.2f}x dense; target >= {TARGET}x: "
              f"{'met' if min(wide) >= TARGET else 'not met'}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 2)
