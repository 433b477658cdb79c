"""Numba kernels of the channel permutation search (no Python API here; see
``transposable/permute.py``).

The search permutes the rows of a score matrix ``A`` (D, K): ``order`` lists A's rows in
their new positions, and every ``m`` consecutive positions form a *group*. A group's value
is what the best mask keeps of its rows:

- *tiles* (transposable masks): the sum over the ``K / m`` column blocks of the exact
  transposable tile optimum (greedy warm start, then cycle canceling until Bellman-Ford
  finds no improving cycle: the same kernels as ``cyclecanceling``);
- *columns* (row-wise masks whose groups run along the permuted axis): the sum over the K
  columns of the ``n`` largest of the group's ``m`` entries.

The columns value is also an upper bound of the tiles value (a tile keeps ``n`` per column
at most), cheap to compute, so the tiles search ranks candidate swaps by it and then
decides with the exact value.

The drivers are serial, release the GIL and work on a range of groups or pairs, which
``_jit.in_parallel`` spreads over threads (``permute.py`` calls them so): compiled with
``parallel=True`` and ``np.argsort`` they took 23-25 s to compile on a 2-core Xeon, and
running them entered numba's OpenMP regions.
"""
import numpy as np

from ._jit import jit
from ._tile_kernels import exact_tile, tile_scratch


@jit()
def columns_value(A, rows, n):
    """Sum over A's columns of the ``n`` largest of ``A[rows, k]``."""
    m = rows.shape[0]
    column = np.empty(m)
    total = 0.0
    for k in range(A.shape[1]):
        for i in range(m):
            column[i] = A[rows[i], k]
        for t in range(n):  # partial selection sort: n passes over m entries
            best = t
            for i in range(t + 1, m):
                if column[i] > column[best]:
                    best = i
            column[t], column[best] = column[best], column[t]
            total += column[t]
    return total


@jit()
def tiles_value(A, rows, n):
    """Sum over A's column blocks of the exact transposable optimum of the tile
    ``A[rows, block]``."""
    m = rows.shape[0]
    w = np.empty((m, m))
    scratch = tile_scratch(m)
    total = 0.0
    for first in range(0, A.shape[1], m):
        for i in range(m):
            for j in range(m):
                w[i, j] = A[rows[i], first + j]
        keep = exact_tile(w, n, True, scratch)
        for i in range(m):
            for j in range(m):
                if keep[i, j]:
                    total += w[i, j]
    return total


@jit(inline="always")
def group_value(A, rows, n, tiles):
    return tiles_value(A, rows, n) if tiles else columns_value(A, rows, n)


@jit(nogil=True)
def group_values(A, order, m, n, tiles, values, start, stop):
    """The values of groups ``start`` to ``stop`` of ``order``, into ``values``."""
    for g in range(start, stop):
        values[g] = group_value(A, order[g * m:(g + 1) * m], n, tiles)


@jit()
def removal_tables(A, rows, n, sums, nth):
    """For every row ``a`` of the group and column ``k``: the sum of the ``n`` largest of
    the other ``m - 1`` rows (``sums[a, k]``) and the ``n``-th largest of them
    (``nth[a, k]``). The columns value of the group with row ``a`` replaced by ``x`` is
    then ``sum_k sums[a, k] + max(0, x[k] - nth[a, k])``."""
    m = rows.shape[0]
    column = np.empty(m - 1)
    for a in range(m):
        for k in range(A.shape[1]):
            c = 0
            for i in range(m):
                if i != a:
                    column[c] = A[rows[i], k]
                    c += 1
            total = 0.0
            for t in range(n):
                best = t
                for i in range(t + 1, m - 1):
                    if column[i] > column[best]:
                        best = i
                column[t], column[best] = column[best], column[t]
                total += column[t]
            sums[a, k] = total
            nth[a, k] = column[n - 1]


@jit()
def replaced_bound(A, sums, nth, a, row):
    total = 0.0
    for k in range(A.shape[1]):
        total += sums[a, k] + max(0.0, A[row, k] - nth[a, k])
    return total


@jit(nogil=True)
def improve_pairs(A, order, values, pairs, m, n, tiles, candidates, tol, gains, start, stop):
    """Improve the pairs of groups ``pairs[p] = (g, h)``, ``p`` from ``start`` to ``stop``,
    each by the best single swap of a row of g with a row of h; the gains into ``gains``
    (the pairs are disjoint, so ranges of pairs on threads write only their own groups of
    ``order`` and ``values``).

    Every one of the ``m * m`` swaps is ranked by its gain in columns value (from
    :func:`removal_tables`, ``O(m K)`` per swap); the best ``candidates`` whose ranking gain
    is positive are then valued exactly (for *columns* the ranking value is the exact one)
    and the best exact gain above ``tol`` is applied. With ``candidates >= m * m`` every
    swap is valued exactly. Swaps are taken by decreasing ranking gain, ties to the lowest
    index, by a selection scan (a sort would cost more to compile than the search saves).
    One swap per pair per call bounds a call's time.
    """
    K = A.shape[1]
    rows_g, rows_h = np.empty(m, np.int64), np.empty(m, np.int64)
    trial_g, trial_h = np.empty(m, np.int64), np.empty(m, np.int64)
    sums_g, nth_g = np.empty((m, K)), np.empty((m, K))
    sums_h, nth_h = np.empty((m, K)), np.empty((m, K))
    ranking = np.empty(m * m)
    taken = np.empty(m * m, np.bool_)
    for p in range(start, stop):
        g, h = pairs[p, 0], pairs[p, 1]
        for i in range(m):
            rows_g[i] = order[g * m + i]
            rows_h[i] = order[h * m + i]
        removal_tables(A, rows_g, n, sums_g, nth_g)
        removal_tables(A, rows_h, n, sums_h, nth_h)
        bound_g, bound_h = columns_value(A, rows_g, n), columns_value(A, rows_h, n)
        for a in range(m):
            for b in range(m):
                ranking[a * m + b] = (replaced_bound(A, sums_g, nth_g, a, rows_h[b])
                                      + replaced_bound(A, sums_h, nth_h, b, rows_g[a]) - bound_g - bound_h)
                taken[a * m + b] = False
        best_gain, best = tol, -1
        best_g, best_h = 0.0, 0.0
        for _ in range(min(candidates, m * m) if tiles else 1):
            swap = -1
            for q in range(m * m):
                if not taken[q] and (swap < 0 or ranking[q] > ranking[swap]):
                    swap = q
            taken[swap] = True
            if candidates < m * m and ranking[swap] <= tol:  # the bound does not rise: skip the
                break  # exact valuation (all m * m candidates: every swap is valued)
            a, b = swap // m, swap % m
            for i in range(m):
                trial_g[i] = rows_g[i]
                trial_h[i] = rows_h[i]
            trial_g[a] = rows_h[b]
            trial_h[b] = rows_g[a]
            value_g, value_h = group_value(A, trial_g, n, tiles), group_value(A, trial_h, n, tiles)
            gain = value_g + value_h - values[g] - values[h]
            if gain > best_gain:
                best_gain, best, best_g, best_h = gain, swap, value_g, value_h
        gains[p] = 0.0
        if best >= 0:
            a, b = best // m, best % m
            order[g * m + a] = rows_h[b]
            order[h * m + b] = rows_g[a]
            gains[p] = best_gain
            values[g], values[h] = best_g, best_h
