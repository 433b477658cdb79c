"""Numba kernels of the greedy engine (no Python API here; see ``greedy.py``)."""
import numpy as np
from numba import njit, prange


@njit(cache=True)
def greedy_tile(w, n, keep, row_count, col_count):
    """Hubara et al.'s greedy: visit entries by decreasing ``w`` (ties: lowest flat index
    first) and keep one while its row and its column hold fewer than ``n``."""
    m = w.shape[0]
    order = np.argsort(-w.ravel(), kind="mergesort")
    kept = 0
    for idx in order:
        i = idx // m
        j = idx - i * m
        if row_count[i] < n and col_count[j] < n:
            keep[i, j] = True
            row_count[i] += 1
            col_count[j] += 1
            kept += 1
            if kept == n * m:
                break


@njit(cache=True)
def best_short_path(w, n, keep, row_count, col_count, start):
    """The largest-gain augmenting path start -> c1 -> r1 -> c with ``c`` short:
    keep (start, c1), drop (r1, c1), keep (r1, c). Returns (c1, r1, c), or c = -1 if none."""
    m = w.shape[0]
    best, best_c1, best_r1, best_c = -np.inf, -1, -1, -1
    for c in range(m):
        if col_count[c] >= n:
            continue
        for c1 in range(m):
            if keep[start, c1]:
                continue
            for r1 in range(m):
                if keep[r1, c1] and not keep[r1, c]:
                    gain = w[start, c1] - w[r1, c1] + w[r1, c]
                    if gain > best:
                        best, best_c1, best_r1, best_c = gain, c1, r1, c
    return best_c1, best_r1, best_c


@njit(cache=True)
def shortest_path(n, keep, col_count, start, parent_of_col, parent_of_row, queue):
    """Breadth-first search for any augmenting path from row ``start`` to a short
    column; fills the parent arrays and returns the end column."""
    m = keep.shape[0]
    parent_of_col[:] = -1
    parent_of_row[:] = -1
    parent_of_row[start] = start
    queue[0] = start
    head, tail = 0, 1
    while head < tail:
        u = queue[head]
        head += 1
        for v in range(m):
            if keep[u, v] or parent_of_col[v] >= 0:
                continue
            parent_of_col[v] = u
            if col_count[v] < n:
                return v
            for u2 in range(m):
                if keep[u2, v] and parent_of_row[u2] < 0:
                    parent_of_row[u2] = v
                    queue[tail] = u2
                    tail += 1
    return -1  # unreachable: an n-regular completion always exists


@njit(cache=True)
def complete_tile(w, n, keep, row_count, col_count):
    """Fill every row and column of the tile up to exactly ``n`` kept entries.

    After the greedy pass no unkept entry has both its row and its column short, so each
    missing unit needs an augmenting path: row -> col (unkept) -> row (kept) -> ... -> a
    short column. Take the largest-gain path of three hops; where none exists, the
    shortest path a breadth-first search finds (one exists, since n-regular masks do).
    A path may trade kept weight for the missing entry.
    """
    m = w.shape[0]
    parent_of_col = np.empty(m, np.int64)
    parent_of_row = np.empty(m, np.int64)
    queue = np.empty(m, np.int64)
    for start in range(m):
        while row_count[start] < n:
            c1, r1, c = best_short_path(w, n, keep, row_count, col_count, start)
            if c >= 0:
                keep[start, c1] = True
                keep[r1, c1] = False
                keep[r1, c] = True
            else:
                c = shortest_path(n, keep, col_count, start, parent_of_col, parent_of_row, queue)
                v = c
                while True:
                    u = parent_of_col[v]
                    keep[u, v] = True
                    if u == start:
                        break
                    keep[u, parent_of_row[u]] = False
                    v = parent_of_row[u]
            row_count[start] += 1
            col_count[c] += 1


@njit(parallel=True)
def greedy_tiles(weights, n):
    """Greedy plus completion on every tile, in parallel over tiles."""
    k, m, _ = weights.shape
    keep = np.zeros(weights.shape, np.bool_)
    for t in prange(k):
        row_count = np.zeros(m, np.int64)
        col_count = np.zeros(m, np.int64)
        greedy_tile(weights[t], n, keep[t], row_count, col_count)
        complete_tile(weights[t], n, keep[t], row_count, col_count)
    return keep
