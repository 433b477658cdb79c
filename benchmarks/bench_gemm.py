"""Linear-layer GEMMs on a GPU: dense vs transposable 2:4 on sparse tensor cores (bf16).

For each shape (tokens x in -> out) it times, with CUDA events (medians): the forward GEMM,
the input-gradient GEMM (dX), and a full forward + backward, for a dense ``nn.Linear`` and
for a ``sparsify``-ed one whose forward and dX run on ``to_sparse_semi_structured``
weights (dW stays dense, so the ideal forward + backward speed-up is 1.5x). Prints ratios
and the device; exits with a message on machines without CUDA.

Run: python benchmarks/bench_gemm.py [--repeat 50]
"""
import argparse
import statistics
import sys

import torch
from torch import nn

from transposable.nn import sparsify

SHAPES = [(13008, 1024, 4096), (13008, 4096, 1024), (4096, 4096, 11008)]


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
    if sparse._sparse_kernels() is None:
        raise RuntimeError(f"the sparse path is not available for {inp}->{out}; see the log")
    x = torch.randn(tokens, inp, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16)
    kernels = sparse._sparse_kernels()
    masked = (sparse.weight * sparse.mask).detach()
    rows = {
        "forward": (lambda: x @ dense.weight.t(), lambda: kernels.forward(x)),
        "dX": (lambda: grad @ masked, lambda: kernels.input_grad(grad)),
        "forward+backward": (lambda: dense(x).backward(grad), lambda: sparse(x).backward(grad)),
    }
    for name, (dense_fn, sparse_fn) in rows.items():
        d, s = time_ms(dense_fn, repeat), time_ms(sparse_fn, repeat)
        print(f"| {tokens}x{inp}->{out} | {name:<16} | {d:9.3f} | {s:9.3f} | {d / s:6.2f}× |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm.py needs a CUDA GPU (Ampere or newer); none is available here")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, medians of {args.repeat}")
    print("| shape (tokens x in -> out) | GEMM | dense ms | 2:4 ms | speed-up |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        bench(*shape, args.repeat)


if __name__ == "__main__":
    main()
