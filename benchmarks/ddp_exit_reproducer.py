"""The abort at exit of a distributed job, made frequent, and its cure (run by torchrun).

Each rank runs 200 all-gathers whose output tensors are freed as soon as the call returns,
so that a gloo worker thread may still hold a finished work item when Python frees them:
the tensors' Python objects then belong to that work item, and releasing it needs the GIL.

``unsafe``: the script just ends. If the thread has not let go yet, it asks for the GIL while
the interpreter finalizes, and the process aborts ("terminate called without an active
exception"). ``clean``: the script ends with ``transposable.nn.end_distributed()``, which
destroys the process group (joining gloo's threads) while the interpreter is still running.

Run through benchmarks/stress_ddp.py: --job unsafe-exit / --job clean-exit.
"""
import sys

import torch
import torch.distributed as dist

from transposable.nn import end_distributed


def gather_once(rank):
    gathered = [torch.empty(1 << 16) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.full((1 << 16,), float(rank)))


def main(ending, out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for _ in range(200):
        gather_once(rank)
    with open(f"{out}.{rank}", "w") as f:
        f.write("done")
    if ending == "clean":
        end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
