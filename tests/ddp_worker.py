"""Run by torchrun in tests/test_nn.py and benchmarks/stress_ddp.py: two ranks train a
sparsified model under DistributedDataParallel (``ddp``, the default) or FSDP2's
``fully_shard`` (``fsdp2``), gloo on CPU, and check after every refresh that all ranks hold
the same masks. Writes the number of refreshes checked to OUT.<rank>.

Under FSDP2 the weights are sharded by rows: with 24 output rows on two ranks each shard has
12, which cuts the 8 x 8 tiles of a 4:8 mask, so the masks are valid only if refreshes see
whole weights. The run ends with a distributed checkpoint (``torch.distributed.checkpoint``)
saved and loaded into a model with other weights and masks, which must get the masks back.

It ends the way every distributed script should (see the README): the training function's
DDP model, optimizer and tensors are gone when it returns, and ``end_distributed`` destroys
the process group before the interpreter finalizes.
"""
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import transposable as tp
from transposable.nn import MaskRefresher, end_distributed, sparse_layers, sparsify


def make(mode, seed=0):
    torch.manual_seed(seed)  # the same initial weights on every rank
    if mode == "ddp":
        model = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), "2:4", refresh_every=2)
        return model, nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    model = sparsify(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16)), "4:8", refresh_every=2)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    return model, fully_shard(model)


def train_and_check(rank, mode):
    """Eight steps with a refresh every two; returns how many refreshes were checked."""
    model, wrapped = make(mode)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    refresher = MaskRefresher(wrapped).attach(optimizer)
    torch.manual_seed(100 + rank)  # different data on every rank
    checked = 0
    for step in range(8):
        optimizer.zero_grad()
        wrapped(torch.randn(8, 16)).pow(2).mean().backward()
        optimizer.step()
        if refresher.history and refresher.history[-1]["step"] == refresher.steps:
            for _, layer in sparse_layers(model):
                gathered = [torch.empty_like(layer.mask) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, layer.mask)
                if not all(torch.equal(g, gathered[0]) for g in gathered):
                    raise SystemExit(f"rank {rank}: masks differ after refresh at step {refresher.steps}")
                if not tp.is_transposable_nm(layer.mask, layer.pattern):
                    raise SystemExit(f"rank {rank}: an invalid mask after refresh at step {refresher.steps}")
            checked += 1
    if mode == "fsdp2":
        check_distributed_checkpoint(rank, model)
    return checked


def check_distributed_checkpoint(rank, model):
    import torch.distributed.checkpoint as dcp

    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    dcp.save({"model": model.state_dict()}, checkpoint_id=folder[0])
    other, _ = make("fsdp2", seed=1)  # other weights, other masks
    state = {"model": other.state_dict()}
    dcp.load(state, checkpoint_id=folder[0])
    other.load_state_dict(state["model"])
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(other)):
        if not torch.equal(a.mask, b.mask):
            raise SystemExit(f"rank {rank}: the distributed checkpoint did not give the masks back")


def main(out, mode="ddp"):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        checked = train_and_check(rank, mode)  # its wrapped model, optimizer and tensors die with it
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(checked))
    finally:
        end_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
