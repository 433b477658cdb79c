"""Run by torchrun in tests/test_nn.py and benchmarks/stress_ddp.py: two ranks train a
sparsified model under DistributedDataParallel (gloo, CPU) and check after every refresh
that all ranks hold the same masks. Writes the number of refreshes checked to OUT.<rank>.

It ends the way every distributed script should (see the README): the training function's
DDP model, optimizer and tensors are gone when it returns, and ``end_distributed`` destroys
the process group before the interpreter finalizes.
"""
import sys

import torch
import torch.distributed as dist
from torch import nn

from transposable.nn import MaskRefresher, end_distributed, sparse_layers, sparsify


def train_and_check(rank):
    """Eight steps with a refresh every two; returns how many refreshes were checked."""
    torch.manual_seed(0)  # same initial weights on every rank
    model = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), "2:4", refresh_every=2)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    refresher = MaskRefresher(ddp).attach(optimizer)
    torch.manual_seed(100 + rank)  # different data on every rank
    checked = 0
    for step in range(8):
        optimizer.zero_grad()
        ddp(torch.randn(8, 16)).pow(2).mean().backward()
        optimizer.step()
        if refresher.history and refresher.history[-1]["step"] == refresher.steps:
            for _, layer in sparse_layers(model):
                gathered = [torch.empty_like(layer.mask) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, layer.mask)
                if not all(torch.equal(g, gathered[0]) for g in gathered):
                    raise SystemExit(f"rank {rank}: masks differ after refresh at step {refresher.steps}")
            checked += 1
    return checked


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        checked = train_and_check(rank)  # its DDP model, optimizer and tensors die with it
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(checked))
    finally:
        end_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
