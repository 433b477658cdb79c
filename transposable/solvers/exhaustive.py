"""Exact transposable masks by enumeration: score every valid tile pattern.

An m x m tile has only a few masks with ``n`` kept in every row and column (90 for 2:4),
so scoring them all and taking the best is exact and cheap. NumPy tiles are scored by a
numba kernel (row sums per column choice; the best bottom half of the tile for every
column count it leaves; every top half with the best bottom half that completes it),
vectorized across a row of tiles; torch tensors by one float64 matrix product
``|tiles| @ patterns.T`` on the tensor's own device (float64, which TF32 never rounds).
"""
import itertools
from functools import lru_cache

import numpy as np

from ._common import as_tiles, contiguous_grid, is_torch, shaped_like

ACCEPTS_TORCH = True
EXACT = True

#: Largest tile side enumerated; 6x6 tiles at 3:6 already have 297,200 patterns.
MAX_M = 5

#: Pattern scores held at once by the torch path (float64: 512 MiB), tiles taken in chunks.
SCORES_PER_CHUNK = 2**26


def supports(n, m):
    """Why the exhaustive method cannot solve ``n:m``, or None if it can (``m <= MAX_M``).

    Parameters
    ----------
    n, m : int
        The pattern.

    Returns
    -------
    str or None
        A sentence naming the limit and the methods to use instead, or None.

    Examples
    --------
    >>> supports(2, 4) is None, supports(4, 8).split(";")[0]
    (True, 'the exhaustive method enumerates tiles up to m=5, got m=8')
    """
    if m > MAX_M:
        return (f"the exhaustive method enumerates tiles up to m={MAX_M}, got m={m}; "
                f"use method='cyclecanceling' or 'mincostflow'")
    return None


@lru_cache(maxsize=None)
def row_patterns(n, m):
    """Every n-regular m x m tile as one column choice per row.

    Returns
    -------
    choices : ndarray of int, shape (C, n)
        The column sets a row may keep, ``itertools.combinations`` order.
    patterns : ndarray of int, shape (P, m)
        For each tile pattern, the index into ``choices`` of every row, in lexicographic
        order, so the first pattern keeps the lowest indices (ties resolve to it).
    """
    choices = np.array(list(itertools.combinations(range(m), n)), dtype=np.int64)
    found = []

    def extend(rows, col_count):
        if len(rows) == m:
            found.append(rows)
            return
        for c, cols in enumerate(choices):
            counts = col_count.copy()
            counts[cols] += 1
            if counts.max() <= n:
                extend(rows + [c], counts)

    extend([], np.zeros(m, dtype=np.int64))
    patterns = np.array(found, dtype=np.int64)
    for table in (choices, patterns):
        table.setflags(write=False)
    return choices, patterns


@lru_cache(maxsize=None)
def split_patterns(n, m):
    """The tables of the kernel's meet in the middle: the first ``h = m // 2`` rows
    (*top*) and the other rows (*bottom*) of every pattern of :func:`row_patterns`, grouped
    by the column counts they need.

    Returns ``choices`` (C, n); ``top_rows`` (T, h) every tuple of choices of the top rows,
    in lexicographic order, and ``top_bucket`` (T,) the index of its column counts (-1 if no
    bottom completes it); ``bottom_rows`` and ``bottom_bucket`` the same for the bottom rows,
    bucketed by the column counts they leave for the top. A top and a bottom form a valid
    pattern exactly when their buckets match, and the pattern's index in
    :func:`row_patterns` order grows with (top index, bottom index).
    """
    choices, _ = row_patterns(n, m)
    h = m // 2
    counts = np.zeros((len(choices), m), dtype=np.int64)
    np.put_along_axis(counts, choices, 1, axis=1)
    top_rows = np.array(list(itertools.product(range(len(choices)), repeat=h)), dtype=np.int64)
    bottom_rows = np.array(list(itertools.product(range(len(choices)), repeat=m - h)), dtype=np.int64)
    top_counts = [tuple(c) for c in counts[top_rows].sum(axis=1)]
    left_counts = [tuple(c) for c in n - counts[bottom_rows].sum(axis=1)]
    bucket = {c: b for b, c in enumerate(sorted(set(top_counts) & set(left_counts)))}
    top_bucket = np.array([bucket.get(c, -1) for c in top_counts], dtype=np.int64)
    bottom_bucket = np.array([bucket.get(c, -1) for c in left_counts], dtype=np.int64)
    return choices, top_rows, top_bucket, bottom_rows, bottom_bucket


@lru_cache(maxsize=None)
def patterns(n, m):
    """Every m x m 0/1 matrix with ``n`` ones per row and column, flattened.

    Returns
    -------
    ndarray of bool, shape (P, m*m)
        In the order of :func:`row_patterns`.

    Examples
    --------
    >>> patterns(2, 4).shape
    (90, 16)
    """
    choices, rows = row_patterns(n, m)
    table = np.zeros((len(rows), m, m), dtype=bool)
    for p, row_choice in enumerate(rows):
        for i, c in enumerate(row_choice):
            table[p, i, choices[c]] = True
    table = table.reshape(len(rows), m * m)
    table.setflags(write=False)
    return table


def solve(tiles, n):
    """Optimal transposable N:M masks of a batch of tiles, by enumeration.

    Parameters
    ----------
    tiles : ndarray or Tensor, shape (K, m, m) or (A, m, B, m), ``m <= MAX_M``
        Weights: a batch of tiles, or a tile grid whose tile ``(a, b)`` is
        ``tiles[a, :, b, :]``. The mask maximises the kept sum of their magnitudes.
    n : int
        Entries kept in every tile row and every tile column, ``0 < n < m``.

    Returns
    -------
    ndarray or Tensor of bool, same shape as ``tiles``
        Same kind and device as ``tiles``.

    Notes
    -----
    Exact. Scores are summed in float64, also on GPUs, where TF32 would round a float32
    product's inputs; among equal scores the lowest-index pattern wins. A tile whose
    largest magnitude is huge (``>= 2**512``) is scaled by a power of two first, so sums do
    not overflow. Cost per tile ``O(C**(m/2) * m)`` for ``C`` row choices: the best top
    half and the best bottom half for every column count they share (numba, vectorized
    across a row of tiles, on threads over rows of tiles), or ``O(P * m**2)`` for ``P``
    patterns as float64 matrix products over chunks of tiles (torch).

    Examples
    --------
    >>> import numpy as np
    >>> tile = np.array([[4., 3, 0, 0], [3, 4, 0, 0], [0, 0, 1, 2], [0, 0, 2, 1]])
    >>> solve(tile[None], 2)[0].astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 1, 1],
           [0, 0, 1, 1]])
    """
    m = tiles.shape[-1]
    if not is_torch(tiles):
        from ._jit import announce_compile, in_parallel
        from ._tile_kernels import exhaustive_grid

        grid = contiguous_grid(tiles)
        mask = np.zeros(grid.shape, dtype=bool)
        with announce_compile("exhaustive masks"):
            in_parallel(exhaustive_grid, grid.shape[0], grid, *split_patterns(n, m), mask)
        return shaped_like(mask, tiles)
    import torch

    from ._torch_tiles import magnitudes

    flat = magnitudes(as_tiles(tiles))
    table = torch.tensor(patterns(n, m), device=flat.device)  # a copy: the cache is read-only
    return shaped_like(table[_best_patterns(flat, table)].reshape(flat.shape), tiles)


def _best_patterns(w, table):
    """Per tile of magnitudes ``w`` (K, m, m; float32 on GPUs), the index of its best row of
    ``table`` (P, m*m), the first among equals. Scored in float64: a float32 product would
    round every weight to 10 mantissa bits where TF32 is on (``set_float32_matmul_precision
    ("high")``, common on GPUs); float64 products never are."""
    import torch

    scorer = table.to(torch.float64).T
    best = torch.empty(len(w), dtype=torch.long, device=w.device)
    step = max(1, SCORES_PER_CHUNK // len(table))
    for lo in range(0, len(w), step):
        best[lo:lo + step] = (w[lo:lo + step].reshape(-1, scorer.shape[0]).to(torch.float64) @ scorer).argmax(dim=1)
    return best
