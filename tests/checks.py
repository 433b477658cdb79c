"""The one mask checker every test uses, and exact references independent of the library."""
import functools
import itertools

import networkx as nx
import numpy as np


def assert_valid_mask(mask, n, m, *, transposable):
    """Exactly ``n`` kept per group of ``m`` along ``in`` and, if transposable, per
    group of ``m`` along ``out`` (= every row and column of every m x m tile)."""
    mask = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask)
    assert mask.dtype == bool, mask.dtype
    taps = np.moveaxis(mask, (0, 1), (-2, -1)).reshape(-1, *mask.shape[:2])
    per_row_group = taps.reshape(taps.shape[0], taps.shape[1], -1, m).sum(-1)
    assert (per_row_group == n).all(), f"row-wise groups keep {np.unique(per_row_group)}, not {n}"
    if transposable:
        per_col_group = taps.reshape(taps.shape[0], -1, m, taps.shape[2]).sum(-2)
        assert (per_col_group == n).all(), f"column groups keep {np.unique(per_col_group)}, not {n}"


def assert_valid_tiles(tiles, n):
    """``assert_valid_mask`` on a solver's ``(K, m, m)`` output, laid out as one
    ``(m, K*m)`` weight whose tiles are exactly those."""
    tiles = np.asarray(tiles.cpu() if hasattr(tiles, "cpu") else tiles)
    k, m, _ = tiles.shape
    assert_valid_mask(tiles.transpose(1, 0, 2).reshape(m, k * m), n, m, transposable=True)


@functools.lru_cache(maxsize=None)
def regular_masks(n, m):
    """Every m x m 0/1 matrix with n ones per row and column, by full enumeration of every
    combination of row choices (independent of ``solvers.exhaustive``), as (P, m, m) bool."""
    choices = list(itertools.combinations(range(m), n))
    found = []
    for rows in itertools.product(choices, repeat=m):
        mask = np.zeros((m, m), bool)
        for i, chosen in enumerate(rows):
            mask[i, list(chosen)] = True
        if (mask.sum(axis=0) == n).all():
            found.append(mask)
    return np.array(found)


def brute_force_best(tile, n):
    """Largest kept sum of |tile| over all n-regular masks (see :func:`regular_masks`)."""
    masks = regular_masks(n, tile.shape[0])
    return float((np.abs(tile)[None] * masks).sum(axis=(1, 2)).max())


def count_regular_masks(n, m):
    """Number of m x m 0/1 matrices with n ones per row and column, by enumeration."""
    return len(regular_masks(n, m))


def networkx_best(tile, n):
    """Largest kept sum of an integer tile's |entries|, by networkx min-cost flow."""
    m = tile.shape[0]
    weights = np.abs(tile).astype(np.int64)
    graph = nx.DiGraph()
    for i in range(m):
        graph.add_node(("r", i), demand=-n)
        graph.add_node(("c", i), demand=n)
        for j in range(m):
            graph.add_edge(("r", i), ("c", j), capacity=1, weight=-int(weights[i, j]))
    flow = nx.min_cost_flow(graph)
    return sum(weights[i, j] for i in range(m) for j in range(m) if flow[("r", i)][("c", j)])


def kept(tile, mask):
    return float(np.abs(tile)[mask].sum())


def brute_force_best_at_most(tile, n):
    """Largest kept sum of |tile| (any r x c) with at most n kept per row and per column, by
    enumerating every row's choice of up to n columns: the reference for cut edge tiles."""
    weights = np.abs(tile)
    rows, cols = weights.shape
    choices = [c for k in range(min(n, cols) + 1) for c in itertools.combinations(range(cols), k)]
    best = 0.0
    for chosen in itertools.product(choices, repeat=rows):
        counts = np.zeros(cols, int)
        for c in chosen:
            counts[list(c)] += 1
        if (counts <= n).all():
            best = max(best, sum(weights[i, list(c)].sum() for i, c in enumerate(chosen)))
    return best


def tile_regions(rows, cols, m):
    """The (row slice, column slice) of every m x m tile of a rows x cols matrix, cut short
    at the bottom and right edges."""
    return [(slice(r, min(r + m, rows)), slice(c, min(c + m, cols)))
            for r in range(0, rows, m) for c in range(0, cols, m)]


def assert_within_rounding(actual, a, b, bias=None):
    """``actual`` is ``a @ b.T (+ bias)`` up to the rounding of ``actual``'s dtype.

    The reference is exact (float64, on the CPU) and each element may be off by
    ``eps * (|a| @ |b|.T + |bias|)``: what one or two roundings to the dtype (a fused bias
    or a separate add) and float32 accumulation, or reduced-precision partial sums, can
    cost. A sum order, not a misread operand, fits inside it. Fixed tolerances do not: a
    float16 product rounded before its bias is added fails ``assert_close``'s defaults.
    """
    import torch

    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    exact, scale = a @ b.T, a.abs() @ b.abs().T
    if bias is not None:
        exact, scale = exact + bias.detach().double().cpu(), scale + bias.detach().double().cpu().abs()
    error = (actual.detach().double().cpu() - exact).abs()
    allowed = torch.finfo(actual.dtype).eps * scale + torch.finfo(actual.dtype).tiny
    worst = (error - allowed).argmax()
    assert bool((error <= allowed).all()), (
        f"{int((error > allowed).sum())} of {error.numel()} elements off by more than their rounding; "
        f"worst: {error.flatten()[worst]:.3g} > {allowed.flatten()[worst]:.3g}")
