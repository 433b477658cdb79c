"""Channel permutations on a real language model's layers: kept score, and apex's search beside ours.

SmolLM2-135M-Instruct (``examples/smollm2_folder.py``), Wanda scores ``|W_ij| * ||X_j||``
from 8 windows of 512 tokens of the Lee news articles 1-200 (the calibration text of
``bench_prune.py``). For every permutable dimension of a few blocks (the MLP hidden
dimension: rows of gate/up, columns of down; the attention value heads: rows of v, columns
of o) and every pattern, the score that the best masks of the dimension's layers keep
after our search (``transposable.permute.permute_dimension``, the code ``prune --permute``
runs), as a gain over the identity, beside the gain of random permutations (the control).

Then apex's permutation search for row-wise 2:4 beside ours, on the same matrices and the
same time budget: apex's greedy channel swap (``Channel_Swap`` of
``apex/contrib/sparsity/permutation_search_kernels/channel_swap.py``: the improvement of
every swap of two columns from different stripes, then the non-conflicting swaps applied
in decreasing order, the stripes they touched re-evaluated, until none improves),
reimplemented with numba from its documented algorithm (apex builds the swap map with a
CUDA kernel; both run compiled here, on the same cores), against
``find_permutation(..., transposable=False)``. Both permute the columns of one matrix
(down_proj or o_proj); gains over the identity.

With ``--global-check``, instead: how far the search stops from the global optimum. On 12
random rows x 256 columns of real up_proj scores (three tiles' worth of rows at 2:4), every
one of the 5,775 groupings into three groups of four is valued (brute force, the exact tile
objective), beside the search run to convergence.

Setup: as ``examples/smollm2_folder.py`` says, plus ``pip install --no-deps gensim`` (the text).
Run: python benchmarks/bench_permute.py [--blocks 0 10 20 29] [--seconds 1] [--workdir DIR] [--global-check]
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from numba import njit, prange

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import prepare  # noqa: E402  (the model folder and the news text)

from transposable.permute import find_permutation, permutable_dimensions, permute_dimension, search  # noqa: E402
from transposable.solvers._permutation_kernels import tiles_value  # noqa: E402

PATTERNS = [("2:4", False), ("2:4", True), ("4:8", True), ("8:16", True)]


def wanda_scores(folder, text, windows=8, seqlen=512):
    """The model and ``|W| * ||X_j||`` of every linear layer of its blocks."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:windows * seqlen]).view(windows, seqlen)
    squares, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            def record(module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                squares[name] = squares.get(name, 0) + x.pow(2).sum(dim=0)
            handles.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    modules = dict(model.named_modules())
    return model, {name: modules[name].weight.detach().double().abs() * total.sqrt()[None, :]
                   for name, total in squares.items()}


@njit(cache=True)
def stripe_value(matrix, columns):
    """apex's ``sum_after_2_to_4`` of one stripe: per row, the two largest of four."""
    total = 0.0
    for i in range(matrix.shape[0]):
        a, b, c, d = matrix[i, columns[0]], matrix[i, columns[1]], matrix[i, columns[2]], matrix[i, columns[3]]
        first, second = max(a, b), min(a, b)
        for x in (c, d):
            if x > first:
                first, second = x, first
            elif x > second:
                second = x
        total += first + second
    return total


@njit(parallel=True, cache=True)
def swap_map(matrix, order, stripes):
    """apex's ``build_swap_map`` for the stripes in ``stripes``: the improvement of every
    swap of a column of such a stripe with a column of any other stripe."""
    count = order.shape[0] // 4
    gains = np.full((count, count, 4, 4), -np.inf)
    for s in prange(count):
        mine = order[4 * s:4 * s + 4].copy()
        base_s = stripe_value(matrix, mine)
        for t in range(count):
            if t == s or not (stripes[s] or stripes[t]):
                continue
            theirs = order[4 * t:4 * t + 4].copy()
            base_t = stripe_value(matrix, theirs)
            for a in range(4):
                for b in range(4):
                    x, y = mine.copy(), theirs.copy()
                    x[a], y[b] = theirs[b], mine[a]
                    gains[s, t, a, b] = stripe_value(matrix, x) + stripe_value(matrix, y) - base_s - base_t
    return gains


def apex_channel_swap(matrix, seconds):
    """Greedy channel swaps (apex ``Channel_Swap``), column order of ``matrix`` (out, in)
    that raises the row-wise 2:4 kept sum, within ``seconds``. Returns (order, rounds)."""
    start = time.perf_counter()
    order = np.arange(matrix.shape[1])
    count = order.shape[0] // 4
    touched = np.ones(count, dtype=np.bool_)
    gains = np.full((count, count, 4, 4), -np.inf)
    rounds = 0
    while time.perf_counter() - start < seconds:
        fresh = swap_map(matrix, order, touched)
        update = touched[:, None] | touched[None, :]
        gains[update] = fresh[update]
        ranked = np.argsort(-gains, axis=None)
        touched = np.zeros(count, dtype=np.bool_)
        applied = 0
        for flat in ranked:
            s, t, a, b = np.unravel_index(flat, gains.shape)
            if gains[s, t, a, b] <= 1e-4 * max(gains.flat[ranked[0]], 0):
                break
            if touched[s] or touched[t]:
                continue
            touched[s] = touched[t] = True
            order[4 * s + a], order[4 * t + b] = order[4 * t + b], order[4 * s + a]
            applied += 1
        rounds += 1
        if applied == 0:
            break
    return order, rounds


def rowwise_kept(matrix, order):
    grouped = matrix[:, order].reshape(matrix.shape[0], -1, 4)
    return float(np.sort(grouped, axis=2)[:, :, 2:].sum())


def global_check(scores, trials=8, seed=0):
    """The converged search against brute force over every grouping of 12 rows into 3 tiles."""
    import itertools

    matrix = scores["model.layers.5.mlp.up_proj"].numpy()
    rng = np.random.default_rng(seed)
    print("| trial | identity | search (converged) | global optimum | search / optimum |")
    print("|---|---|---|---|---|")
    for trial in range(trials):
        A = np.ascontiguousarray(matrix[rng.choice(matrix.shape[0], 12, replace=False)][:, :256])
        A /= A.mean()
        value = lambda groups: sum(tiles_value(A, np.array(g), 2) for g in groups)  # noqa: E731
        best = 0.0
        for rest in itertools.combinations(range(1, 12), 3):
            first = (0, *rest)
            others = [i for i in range(12) if i not in first]
            for tail in itertools.combinations(others[1:], 3):
                second = (others[0], *tail)
                best = max(best, value([first, second, [i for i in others if i not in second]]))
        identity = value([range(0, 4), range(4, 8), range(8, 12)])
        _, found, _, converged = search(A, 2, 4, tiles=True, seconds=60)
        print(f"| {trial} | {identity:.1f} | {found:.1f} ({100 * (found / identity - 1):+.2f} %"
              f"{'' if converged else ', not converged'}) | {best:.1f} ({100 * (best / identity - 1):+.2f} %) | "
              f"{found / best:.4f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--seconds", type=float, default=1.0, help="search budget per dimension (default 1, as prune)")
    parser.add_argument("--apex-seconds", type=float, nargs="+", default=[2.0, 10.0, 30.0])
    parser.add_argument("--workdir", help="keep the model folder and texts here (default: a temporary folder)")
    parser.add_argument("--global-check", action="store_true", help="only the search against the global optimum")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        folder, calibration, _ = prepare(workdir)
        model, scores = wanda_scores(folder, calibration.read_text())
    if args.global_check:
        global_check(scores)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; SmolLM2-135M-Instruct, "
          f"Wanda scores on 8 x 512 calibration tokens; search budget {args.seconds:g} s per dimension")
    print()
    print("| block | dimension | pattern | gain (ours) | gain (random) | seconds | converged |")
    print("|---|---|---|---|---|---|---|")
    gains = {}
    for block in args.blocks:
        prefix = f"model.layers.{block}"
        for dimension in permutable_dimensions(model.model.layers[block], prefix):
            for pattern, transposable in PATTERNS:
                original = {name: module.weight.detach().clone() for name, module, _, _ in dimension.members}
                report = permute_dimension(dimension, {n: scores[n] for n, *_ in dimension.members}, pattern,
                                           transposable=transposable, seconds=args.seconds)
                with torch.no_grad():  # back to the original order for the next pattern
                    for name, module, _, _ in dimension.members:
                        module.weight.copy_(original[name])
                label = f"{pattern}{' T' if transposable else ''}"
                kind = dimension.name.rsplit(" ", 1)[-1]
                gains.setdefault((kind, label), []).append(report.gain)
                print(f"| {block} | {kind} | {label} | {100 * report.gain:+.2f} % | {100 * report.gain_random:+.2f} % "
                      f"| {report.seconds:.1f} | {'yes' if report.converged else 'no'} |", flush=True)
    print()
    print("| dimension | pattern | mean gain (ours) |")
    print("|---|---|---|")
    for (kind, label), values in gains.items():
        print(f"| {kind} | {label} | {100 * np.mean(values):+.2f} % |")
    print()
    print("Row-wise 2:4, columns of one matrix permuted: gain in kept score over the identity, same budget")
    print()
    print("| matrix | budget s | ours | ours s | apex channel swap | apex s | apex rounds |")
    print("|---|---|---|---|---|---|---|")
    apex_channel_swap(np.ones((4, 16)), 1.0)  # compile outside the timed runs
    find_permutation(np.ones((4, 16)), "2:4", transposable=False, max_rounds=1)
    for block in args.blocks[:2]:
        for name in ("mlp.down_proj", "self_attn.o_proj"):
            matrix = scores[f"model.layers.{block}.{name}"].numpy()
            identity = rowwise_kept(matrix, np.arange(matrix.shape[1]))
            for seconds in args.apex_seconds:
                ours = find_permutation(matrix, "2:4", transposable=False, seconds=seconds)
                start = time.perf_counter()
                order, rounds = apex_channel_swap(matrix, seconds)
                elapsed = time.perf_counter() - start  # a round is not interrupted: it may overrun the budget
                print(f"| {block}.{name} {matrix.shape[0]}x{matrix.shape[1]} | {seconds:g} | "
                      f"{100 * ours.gain:+.2f} % | {ours.seconds:.1f} | "
                      f"{100 * (rowwise_kept(matrix, order) / identity - 1):+.2f} % | {elapsed:.1f} | {rounds} |",
                      flush=True)


if __name__ == "__main__":
    main()
