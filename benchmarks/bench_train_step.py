"""Training steps of a decoder-only transformer: dense vs transposable 2:4, end to end.

The model is built from plain PyTorch pieces (embedding, pre-norm blocks of attention and
a 4x MLP, tied-free output head) and sparsified with the library's own
``sparsify(model, "2:4", transposable=True)``: every linear layer of the blocks is sparse,
the embedding and the output head stay dense. A third model is row-wise 2:4 with a backward
mask (``transposable=False, backward_mask=True``: both GEMMs sparse as well, the input
gradient's mask chosen every step). The models train with AdamW on random tokens in the same
run; a ``MaskRefresher`` re-solves the sparse models' masks every 40 steps (transposable:
with the greedy), on the model's device, and its time is counted in the sparse model's
steps and reported separately as the refresh overhead per step.

On a GPU (the default there): bf16, hidden 2048, 8 layers, sequence 2048. Elsewhere it runs
the same code small and in float32 so that it can be checked on any machine; the numbers
mean something only on a GPU.

Run: python benchmarks/bench_train_step.py [--hidden 2048 --layers 8 --seq 2048 --batch 4]
     [--steps 80] [--json FILE]
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from transposable.nn import MaskRefresher, sparsify

REFRESH_EVERY = 40


class Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.up, self.down = nn.Linear(hidden, 4 * hidden, bias=False), nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x):
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, seq, 3, self.heads, hidden // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, hidden))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Decoder(nn.Module):
    def __init__(self, vocab, hidden, layers, heads):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(model, tokens, steps, warmup, refresher=None):
    """Seconds per training step (median over ``steps`` after ``warmup``), and the refresh
    seconds inside the timed steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = tokens.device
    times, refresh_seconds = [], 0.0
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if refresher is not None:
            synchronize(device)
            before = time.perf_counter()
            refresher.step()
            synchronize(device)
            if step >= warmup:
                refresh_seconds += time.perf_counter() - before
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if not math.isfinite(float(loss.detach())):
        raise RuntimeError("the loss is not finite")
    return times, refresh_seconds


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048 if cuda else 128)
    parser.add_argument("--layers", type=int, default=8 if cuda else 2)
    parser.add_argument("--heads", type=int, default=16 if cuda else 4)
    parser.add_argument("--seq", type=int, default=2048 if cuda else 128)
    parser.add_argument("--batch", type=int, default=4 if cuda else 2)
    parser.add_argument("--vocab", type=int, default=32000 if cuda else 1000)
    parser.add_argument("--steps", type=int, default=2 * REFRESH_EVERY, help="timed steps (default 80)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    tokens = torch.randint(args.vocab, (args.batch, args.seq + 1), device=device)

    def build():
        torch.manual_seed(0)
        return Decoder(args.vocab, args.hidden, args.layers, args.heads).to(device, dtype)

    def sparse_step(**options):
        """Seconds per step of a sparse model, the layers on sparse kernels, the refreshes."""
        sparse = sparsify(build(), "2:4", exclude=("embed", "head"), refresh_every=REFRESH_EVERY, **options)
        kernels = sum(layer._sparse_kernels() is not None for layer in sparse.modules() if hasattr(layer, "_kernels"))
        refresher = MaskRefresher(sparse)
        times, refresh_seconds = train(sparse, tokens, args.steps, args.warmup, refresher)
        # Refreshes fall on every 40th step: the median of the step times leaves them out, so the
        # sparse time per step is the median plus the refresh time spread over all timed steps.
        return statistics.median(times) + refresh_seconds / args.steps, kernels, refresher, refresh_seconds

    dense_step = statistics.median(train(build(), tokens, args.steps, args.warmup)[0])
    step, kernels, refresher, refresh_seconds = sparse_step(transposable=True)
    bimask_step, bimask_kernels, _, _ = sparse_step(transposable=False, backward_mask=True)
    tokens_per_step = args.batch * args.seq
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).replace("torch.", ""),
        "hidden": args.hidden, "layers": args.layers, "seq": args.seq, "batch": args.batch, "steps": args.steps,
        "sparse_layers": len(refresher.layers), "layers_on_sparse_kernels": kernels,
        "dense_tokens_per_s": tokens_per_step / dense_step, "sparse_tokens_per_s": tokens_per_step / step,
        "speedup": dense_step / step, "refresh_seconds": refresh_seconds,
        "refreshes": len(refresher.history), "refresh_overhead": refresh_seconds / args.steps / step,
        "backward_mask_layers_on_sparse_kernels": bimask_kernels,
        "backward_mask_tokens_per_s": tokens_per_step / bimask_step, "backward_mask_speedup": dense_step / bimask_step,
    }
    print(f"device: {result['device']}, {result['dtype']}, hidden {args.hidden}, {args.layers} layers, "
          f"sequence {args.seq}, batch {args.batch}; {args.steps} timed steps after {args.warmup}")
    print(f"sparse layers: {result['sparse_layers']} (on sparse tensor cores: {kernels} transposable, "
          f"{bimask_kernels} row-wise with a backward mask)")
    print("| model | tokens/s | × dense |")
    print("|---|---|---|")
    print(f"| dense | {result['dense_tokens_per_s']:.0f} | 1.00 |")
    print(f"| 2:4 transposable, refreshed every {REFRESH_EVERY} steps | {result['sparse_tokens_per_s']:.0f} | "
          f"{result['speedup']:.2f} |")
    print(f"| 2:4 row-wise with a backward mask, refreshed every {REFRESH_EVERY} steps | "
          f"{result['backward_mask_tokens_per_s']:.0f} | {result['backward_mask_speedup']:.2f} |")
    print(f"refresh (transposable): {result['refreshes']} refreshes, {refresh_seconds:.3f} s in all, "
          f"{100 * result['refresh_overhead']:.2f} % of a sparse step")
    if not cuda:
        print("(no CUDA device: a small float32 run on the CPU, to check the code; the numbers mean nothing)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
