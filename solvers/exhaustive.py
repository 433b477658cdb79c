"""Exact transposable masks by enumeration: score every valid tile pattern at once.

An m x m tile has only a few masks with ``n`` kept in every row and column (90 for 2:4),
so one matrix product ``|tiles| @ patterns.T`` scores them all and the argmax is the
optimum. Torch tensors are solved with torch on their own device.
"""
import itertools
from functools import lru_cache

import numpy as np

from ._common import is_torch

ACCEPTS_TORCH = True
EXACT = True

#: Largest tile side enumerated; 6x6 tiles at 3:6 already have 297,200 patterns.
MAX_M = 5


def supports(n, m):
    if m > MAX_M:
        return (f"the exhaustive method enumerates tiles up to m={MAX_M}, got m={m}; "
                f"use method='mincostflow'")
    return None


@lru_cache(maxsize=None)
def patterns(n, m):
    """Every m x m 0/1 matrix with ``n`` ones per row and column, flattened.

    Returns
    -------
    ndarray of bool, shape (P, m*m)
        Lexicographic order of the rows' column choices, so the first pattern keeps the
        lowest indices (ties in ``solve`` resolve to it).

    Examples
    --------
    >>> patterns(2, 4).shape
    (90, 16)
    """
    rows = [np.isin(np.arange(m), c) for c in itertools.combinations(range(m), n)]
    found = []

    def extend(chosen, col_count):
        if len(chosen) == m:
            found.append(np.concatenate(chosen))
            return
        for row in rows:
            counts = col_count + row
            if counts.max() <= n:
                extend(chosen + [row], counts)

    extend([], np.zeros(m, dtype=int))
    out = np.array(found, dtype=bool)
    out.setflags(write=False)
    return out


def solve(tiles, n):
    """Optimal transposable N:M masks of a batch of tiles, by enumeration.

    Parameters
    ----------
    tiles : ndarray or Tensor, shape (K, m, m), ``m <= MAX_M``
        Weights; the mask maximises the kept sum of their magnitudes.
    n : int
        Entries kept in every tile row and every tile column, ``0 < n < m``.

    Returns
    -------
    ndarray or Tensor of bool, shape (K, m, m)
        Same kind and device as ``tiles``.

    Notes
    -----
    Exact. Scores are summed in float64 (float32 on GPUs, where float64 is slow); among
    equal scores the lowest-index pattern wins. Cost ``O(K * P * m**2)`` for ``P``
    patterns, one matrix product.

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
    k, m, _ = tiles.shape
    table = patterns(n, m)
    if is_torch(tiles):
        import torch

        dtype = torch.float32 if tiles.device.type == "cuda" else torch.float64
        table_t = torch.tensor(table, device=tiles.device)  # a copy: the cached table is read-only
        scores = tiles.reshape(k, m * m).abs().to(dtype) @ table_t.to(dtype).T
        return table_t[scores.argmax(dim=1)].reshape(k, m, m)
    scores = np.abs(tiles.reshape(k, m * m)).astype(np.float64) @ table.T.astype(np.float64)
    return table[scores.argmax(axis=1)].reshape(k, m, m)
