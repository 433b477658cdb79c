"""Numba kernels for transposable tile masks, and their drivers (no Python API here; see
``greedy.py``, ``cyclecanceling.py`` and ``exhaustive.py``).

Everything is compiled with numba's cache (see ``_jit.py``). The drivers are serial and
release the GIL; ``_jit.in_parallel`` runs them on chunks of tile rows on threads. Each
tile's steps are inlined into its driver (``inline="always"``): a call per tile that passes
a dozen arrays costs their reference counting, which at 2:4 (a million tiles in a 4096²
weight) was a third of the greedy's time.

Drivers take a *tile grid* ``(A, m, B, m)``: tile ``(a, b)`` is ``grid[a, :, b, :]``, so an
``(out, in)`` weight is its own grid after a free reshape, and ``(K, m, m)`` tiles are the
grid ``(K, m, 1, m)``. They write a bool grid of the same shape, ``out``, for the tile rows
``start`` to ``stop``.

A tile mask with exactly ``n`` per row and column is a flow; its residual graph has an arc
row i -> col j of cost ``-w[i, j]`` for every dropped entry and col j -> row i of cost
``+w[i, j]`` for every kept one. The mask is optimal exactly when that graph has no
negative cycle; canceling one (keeping its row->col entries, dropping its col->row ones)
keeps every row and column count and raises the kept sum by the cycle's gain.
"""
import math

import numpy as np

from ._common import SCALE_ABOVE
from ._jit import jit


@jit(inline="always")
def load_tile(grid, a, b, w):
    """``|tile (a, b)|`` into ``w`` (float64). A tile whose largest entry is at least
    ``2**SCALE_ABOVE`` is scaled by a power of two (exact) to below 1, so that no sum of its
    entries overflows; every other tile is copied as it is."""
    m = w.shape[0]
    peak = 0.0
    for i in range(m):
        for j in range(m):
            w[i, j] = abs(grid[a, i, b, j])
            peak = max(peak, w[i, j])
    exponent = math.frexp(peak)[1]
    if exponent > SCALE_ABOVE:
        for i in range(m):
            for j in range(m):
                w[i, j] = math.ldexp(w[i, j], -exponent)


@jit(inline="always")
def store_tile(keep, out, a, b):
    m = keep.shape[0]
    for i in range(m):
        for j in range(m):
            out[a, i, b, j] = keep[i, j]


#: Tiles with more entries than this are radix sorted; smaller ones rank by counting.
SORT_ABOVE = 64


@jit(inline="always")
def order_entries(w, float64_order, flat, keys, key_floats, key_bits, order, spare, counts):
    """Flat indices of the tile by decreasing ``w``, ties by increasing index, compared in
    the input's precision.

    For non-negative floats the bit patterns sort like the values, so the keys are the bits
    of each entry as float32 (for float32 and narrower inputs, where that is exact) or as
    float64 (``float64_order``: float32 would tie values beyond its range and near-ties
    below its resolution). Small tiles count each entry's rank (branch-free, vectorized:
    faster than sorting up to 64 entries); larger ones are radix sorted.
    """
    m = w.shape[0]
    size = m * m
    for i in range(m):
        for j in range(m):
            flat[i * m + j] = w[i, j]
    if float64_order:
        float_keys = flat.view(np.int64)
        for q in range(size):
            keys[q] = float_keys[q]
    else:
        for q in range(size):
            key_floats[q] = flat[q]
        for q in range(size):
            keys[q] = key_bits[q]
    if size > SORT_ABOVE:
        radix_order(keys, 64 if float64_order else 32, order, spare, counts)
    elif float64_order:
        for q in range(size):
            key = keys[q]
            rank = 0
            for p in range(size):
                rank += (keys[p] > key) | ((keys[p] == key) & (p < q))
            order[rank] = q
    else:  # float32 bits and the reversed index in one key: one comparison ranks a pair
        for q in range(size):
            keys[q] = (keys[q] << 32) | (size - 1 - q)
        for q in range(size):
            key = keys[q]
            rank = 0
            for p in range(size):
                rank += keys[p] > key
            order[rank] = q


@jit()
def radix_order(keys, bits, order, spare, counts):
    """``order`` = the indices of ``keys`` (non-negative, below ``2**bits``) by decreasing
    key, ties by increasing index: a stable LSD radix sort of the digits ``255 - byte``,
    one byte a pass (``counts`` holds one histogram per pass, all counted in one read of
    the keys), skipping the passes in which every key has the same byte."""
    size = keys.shape[0]
    passes = bits // 8
    for p in range(passes):
        for d in range(256):
            counts[p, d] = 0
    for q in range(size):
        key = keys[q]
        for p in range(passes):
            counts[p, 255 - ((key >> (8 * p)) & 255)] += 1
    source, target = order, spare
    for q in range(size):
        source[q] = q
    for p in range(passes):
        if counts[p, 255 - ((keys[0] >> (8 * p)) & 255)] == size:
            continue
        total = 0
        for d in range(256):
            total, counts[p, d] = total + counts[p, d], total
        for r in range(size):
            q = source[r]
            d = 255 - ((keys[q] >> (8 * p)) & 255)
            target[counts[p, d]] = q
            counts[p, d] += 1
        source, target = target, source
    if source is not order:
        for r in range(size):
            order[r] = source[r]


@jit(inline="always")
def greedy_tile(w, n, keep, row_count, col_count, order):
    """Hubara et al.'s greedy: visit entries in ``order`` (by decreasing ``w``) and keep
    one while its row and its column hold fewer than ``n``. Returns how many it kept.
    Branch-free (whether an entry fits is as good as random to a branch predictor)."""
    m = w.shape[0]
    kept = 0
    for r in range(m * m):
        q = order[r]
        i = q // m
        j = q - i * m
        fits = (row_count[i] < n) & (col_count[j] < n)
        keep[i, j] = fits
        row_count[i] += fits
        col_count[j] += fits
        kept += fits
        if kept == n * m:
            break
    return kept


@jit()
def best_short_path(w, n, keep, col_count, start, head_gain):
    """The largest-gain augmenting path start -> c1 -> r1 -> c with ``c`` short:
    keep (start, c1), drop (r1, c1), keep (r1, c). Returns (c1, r1, c), the first in
    (c, c1, r1) order among equal gains; see ``complete_tile`` for why one exists.

    ``head_gain[r1]``, the best ``w[start, c1] - w[r1, c1]`` over the columns c1 that row
    r1 can give up, does not depend on c: with it every short column costs ``O(m)``, and
    only the best one is searched pair by pair for its first best path (``O(m**2)``),
    instead of ``O(m**2)`` for every short column.
    """
    m = w.shape[0]
    for r1 in range(m):
        head_gain[r1] = -np.inf
    for c1 in range(m):
        if not keep[start, c1]:
            for r1 in range(m):
                gain = w[start, c1] - w[r1, c1] if keep[r1, c1] else -np.inf
                head_gain[r1] = gain if gain > head_gain[r1] else head_gain[r1]
    best, best_c = -np.inf, -1
    for c in range(m):
        if col_count[c] < n:
            for r1 in range(m):
                gain = head_gain[r1] + w[r1, c] if not keep[r1, c] else -np.inf
                if gain > best:
                    best, best_c = gain, c
    c = best_c
    for c1 in range(m):  # the same sums as above, so one equals ``best`` exactly
        if not keep[start, c1]:
            for r1 in range(m):
                if keep[r1, c1] and not keep[r1, c] and w[start, c1] - w[r1, c1] + w[r1, c] == best:
                    return c1, r1, c
    return -1, -1, -1  # not reached


@jit(inline="always")
def complete_tile(w, n, keep, row_count, col_count, head_gain):
    """Fill every row and column of the tile up to exactly ``n`` kept entries, each
    missing unit by the largest-gain augmenting path start -> c1 -> r1 -> c.

    Such a path always exists. After the greedy pass no dropped entry has both its row
    and its column short, and augmenting keeps it so (only the path's end counts grow).
    Take a short row r and a short column c: (r, c) is kept. Let R be the rows that drop
    c, C the columns r drops. If no kept entry lay in R x C, every row of R would keep
    only columns r keeps (fewer than n: short), and every column of C would be kept only
    by rows keeping c (fewer than n: short), so any entry of R x C would be dropped with
    a short row and a short column. A path may trade kept weight for the missing entry.
    """
    m = w.shape[0]
    for start in range(m):
        while row_count[start] < n:
            c1, r1, c = best_short_path(w, n, keep, col_count, start, head_gain)
            keep[start, c1] = True
            keep[r1, c1] = False
            keep[r1, c] = True
            row_count[start] += 1
            col_count[c] += 1


@jit()
def hop_column(w, keep, i, k):
    """The column of the cheapest hop row i -> row k (see ``cancel_negative_cycles``)."""
    best, best_j = np.inf, -1
    for j in range(w.shape[0]):
        if keep[k, j] and not keep[i, j] and w[k, j] - w[i, j] < best:
            best, best_j = w[k, j] - w[i, j], j
    return best_j


@jit(fastmath={"nnan", "nsz", "reassoc"})
def hop_costs(w, keep, hop_cost, kept_t, dropped_t, changed, column):
    """Row-graph hop costs ``hop_cost[i, k] = min_j w[k, j] - w[i, j]`` over the columns j
    that row k keeps and row i drops (+inf if none), for the hops from or to a ``changed``
    row (all of them when every row is changed).

    ``kept_t[j, k]`` is ``w[k, j]`` where kept, else +inf, and ``dropped_t[j, i]`` is
    ``w[i, j]`` where dropped, else -inf (refreshed here for the rows recomputed), so the
    minimum is branch-free. Above ``m = 8`` every inner loop is an element-wise minimum over
    contiguous memory, which the compiler vectorizes (a minimum *reduction* it does not).
    Up to ``m = 8`` such short vector loops cost more than they save: one scalar minimum per
    hop is faster, over the tables stored untransposed (``kept_t[k, j]``, ``dropped_t[i,
    j]``) so that it reads two contiguous rows (4:8 exact on an Intel Xeon: 3.3x topk,
    against 3.5x transposed).
    """
    m = w.shape[0]
    if m <= 8:  # row-major tables: each hop's minimum reads two contiguous rows
        for i in range(m):
            if changed[i]:
                for j in range(m):
                    kept_t[i, j] = w[i, j] if keep[i, j] else np.inf
                    dropped_t[i, j] = -np.inf if keep[i, j] else w[i, j]
        for i in range(m):
            for k in range(m):
                if not (changed[i] or changed[k]):
                    continue
                best = np.inf
                for j in range(m):
                    best = min(best, kept_t[k, j] - dropped_t[i, j])
                hop_cost[i, k] = best
        return
    rows = 0
    for i in range(m):
        if changed[i]:
            rows += 1
            for j in range(m):
                kept_t[j, i] = w[i, j] if keep[i, j] else np.inf
                dropped_t[j, i] = -np.inf if keep[i, j] else w[i, j]
    for i in range(m):  # hops from row i
        if not changed[i]:
            continue
        for k in range(m):
            hop_cost[i, k] = np.inf
        for j in range(m):
            if not keep[i, j]:
                offset = w[i, j]
                for k in range(m):
                    candidate = kept_t[j, k] - offset
                    hop_cost[i, k] = candidate if candidate < hop_cost[i, k] else hop_cost[i, k]
    if rows == m:
        return
    for k in range(m):  # hops into row k
        if not changed[k]:
            continue
        for i in range(m):
            column[i] = np.inf
        for j in range(m):
            if keep[k, j]:
                offset = w[k, j]
                for i in range(m):
                    candidate = offset - dropped_t[j, i]
                    column[i] = candidate if candidate < column[i] else column[i]
        for i in range(m):
            hop_cost[i, k] = column[i]


@jit(fastmath={"nnan", "nsz", "reassoc"}, inline="always")
def two_opt_tile(w, keep, max_rounds, tol, kept_w, dropped_w):
    """Swaps between pairs of rows (row i gives up a column to row k and takes one
    back): the negative 2-cycles i -> k -> i of the row graph. Up to ``max_rounds``
    passes over all row pairs; stops early when a pass gains nothing above ``tol``.

    Each pair's two hop costs are computed when the pair is visited (``O(m)``, from
    ``kept_w``: ``w`` where kept, else +inf, and ``dropped_w``: ``w`` where dropped, else
    -inf, both kept current by every swap): ``O(m**3)`` a pass, with no table of all hop
    costs to build and to update after each swap.
    """
    m = w.shape[0]
    for i in range(m):
        for j in range(m):
            kept_w[i, j] = w[i, j] if keep[i, j] else np.inf
            dropped_w[i, j] = -np.inf if keep[i, j] else w[i, j]
    for _ in range(max_rounds):
        improved = False
        for i in range(m):
            for k in range(i + 1, m):
                forward, backward = np.inf, np.inf
                for j in range(m):
                    forward = min(forward, kept_w[k, j] - dropped_w[i, j])
                    backward = min(backward, kept_w[i, j] - dropped_w[k, j])
                if forward + backward < -tol:
                    j = hop_column(w, keep, i, k)  # both columns before either flip
                    l = hop_column(w, keep, k, i)
                    for row, col, kept in ((i, j, True), (k, j, False), (k, l, True), (i, l, False)):
                        keep[row, col] = kept
                        kept_w[row, col] = w[row, col] if kept else np.inf
                        dropped_w[row, col] = -np.inf if kept else w[row, col]
                    improved = True
        if not improved:
            return


@jit(inline="always")
def relax_from(start, i, costs, dist, pred, relaxed, tol):
    """Relax every hop out of row ``i`` (at distance ``start``) that gains more than
    ``tol``. Returns how many relaxed.

    Above ``m = 8`` branch-free, so the compiler vectorizes it; up to ``m = 8`` the loop is
    too short for vector code, and a branch is cheaper: after the first pass few hops relax,
    so it is well predicted (4:8 exact on an Intel Xeon: 3.5x topk against 3.9x).
    """
    changes = 0
    if costs.shape[0] <= 8:
        for k in range(costs.shape[0]):
            candidate = start + costs[k]
            if candidate < dist[k] - tol:
                dist[k] = candidate
                pred[k] = i
                relaxed[k] = True
                changes += 1
        return changes
    for k in range(costs.shape[0]):
        candidate = start + costs[k]
        better = candidate < dist[k] - tol
        dist[k] = candidate if better else dist[k]
        pred[k] = i if better else pred[k]
        relaxed[k] |= better
        changes += better
    return changes


@jit()
def cancel_pred_cycles(w, keep, hop_cost, pred, relaxed, stamp, changed):
    """Cancel every cycle of the predecessor graph, found by walking back from the rows
    relaxed in this pass (each row visited once), and mark their rows ``changed``; returns
    how many. The cycles share no row, so canceling one leaves the others' hops valid."""
    m = pred.shape[0]
    stamp[:] = -1
    changed[:] = False
    found = 0
    for s in range(m):
        if not relaxed[s]:
            continue
        v = s
        while v >= 0 and stamp[v] < 0:
            stamp[v] = s
            v = pred[v]
        if v < 0 or stamp[v] != s:
            continue
        start = v
        while True:  # columns first, then flips: a flip changes later hops' columns
            u = pred[v]
            hop_cost[u, v] = hop_column(w, keep, u, v)
            changed[u] = True  # every row of the cycle is some hop's u
            v = u
            if v == start:
                break
        while True:
            u = pred[v]
            j = np.int64(hop_cost[u, v])
            keep[u, j] = True
            keep[v, j] = False
            v = u
            if v == start:
                break
        found += 1
    return found


@jit(inline="always")
def cancel_negative_cycles(w, keep, tol, hop_cost, kept_w, dropped_w, dist, pred, relaxed, stamp,
                           changed, column):
    """Cancel improving cycles until Bellman-Ford proves there is none.

    Works on the row graph: a hop row i -> row k through column j keeps (i, j) (dropped
    now) and drops (k, j) (kept now), at cost ``w[k, j] - w[i, j]``; between two rows
    only the cheapest column matters. Residual cycles and row-graph cycles are the same
    thing, so no negative row cycle means optimal. Every row starts at distance 0 (a
    virtual source); a hop relaxes only when it gains more than ``tol``, so on return no
    cycle gains more than ``m * tol``. Passes run until nothing relaxes (optimal) or the
    predecessor graph has a cycle: every such cycle is negative (around it, each
    predecessor's distance plus the hop cost is at most the distance it set, and the last
    hop set lowered one by more than ``tol``), and while a negative cycle exists one
    appears after finitely many passes (Cherkassky and Goldberg, 1999); all the cycles of
    the predecessor graph are canceled before the next search. A pass relaxes the hops out
    of one row at a time, branch-free, which the compiler vectorizes. Returns the number
    of cycles canceled.

    A search after a cancel starts from the distances the last one left, not from 0: both
    arguments above hold from any starting distances (a search without a cycle ends
    because each row's distance stays above its tree root's, which never moves), and the
    rows the canceled cycles did not touch start nearly settled, so the search that proves
    optimality needs fewer passes (4:8 to 16:32 exact 5-13 % faster on an Intel Xeon).
    """
    m = w.shape[0]
    canceled = 0
    changed[:] = True
    hop_costs(w, keep, hop_cost, kept_w, dropped_w, changed, column)
    dist[:] = 0.0
    while True:
        pred[:] = -1
        while True:
            relaxed[:] = False
            changes = 0
            for i in range(m):
                changes += relax_from(dist[i], i, hop_cost[i], dist, pred, relaxed, tol)
            if changes == 0:
                return canceled
            found = cancel_pred_cycles(w, keep, hop_cost, pred, relaxed, stamp, changed)
            if found > 0:
                break
        hop_costs(w, keep, hop_cost, kept_w, dropped_w, changed, column)
        canceled += found


@jit()
def tile_scratch(m):
    """The work arrays of :func:`warm_start` and :func:`exact_tile` for ``m x m`` tiles,
    allocated once per call of a driver."""
    size = m * m
    key_floats = np.empty(size, np.float32)
    return (np.empty((m, m), np.bool_), np.empty(m, np.int64), np.empty(m, np.int64), np.empty(size),
            np.empty(size, np.int64), key_floats, key_floats.view(np.int32), np.empty(size, np.int64),
            np.empty(size, np.int64), np.empty((8, 256), np.int64),
            np.empty((m, m)), np.empty((m, m)), np.empty((m, m)), np.empty(m), np.empty(m, np.int64),
            np.empty(m, np.bool_), np.empty(m, np.int64), np.empty(m, np.bool_), np.empty(m))


@jit(inline="always")
def warm_start(w, n, float64_order, scratch):
    """Greedy and completion on one tile ``w`` (float64, non-negative): returns its mask
    (an array of ``scratch``) and the gain below which changes are rounding (``tol``).
    ``float64_order`` orders entries in float64 rather than by float32 keys."""
    keep, row_count, col_count, flat, keys, key_floats, key_bits, order, spare, counts = scratch[:10]
    head_gain = scratch[18]  # the cycle search's ``column``: the two are never in use at once
    m = w.shape[0]
    keep[:] = False
    row_count[:] = 0
    col_count[:] = 0
    order_entries(w, float64_order, flat, keys, key_floats, key_bits, order, spare, counts)
    if greedy_tile(w, n, keep, row_count, col_count, order) < n * m:
        complete_tile(w, n, keep, row_count, col_count, head_gain)
    return keep, 1e-12 * w[order[0] // m, order[0] % m]  # far above float64 rounding of an m-hop cycle


@jit(inline="always")
def exact_tile(w, n, float64_order, scratch):
    """The optimal mask of one tile: :func:`warm_start`, then cycle canceling."""
    keep, tol = warm_start(w, n, float64_order, scratch)
    hop_cost, kept_w, dropped_w, dist, pred, relaxed, stamp, changed, column = scratch[10:]
    cancel_negative_cycles(w, keep, tol, hop_cost, kept_w, dropped_w, dist, pred, relaxed, stamp, changed, column)
    return keep


# Two drivers rather than one with flags: a first call compiles only the steps it runs.
@jit(nogil=True)
def greedy_grid(grid, n, rounds, float64_order, out, start, stop):
    """:func:`warm_start` and up to ``rounds`` 2-opt passes on the tiles of rows ``start``
    to ``stop`` of the grid, into the bool grid ``out``."""
    m = grid.shape[1]
    w = np.empty((m, m))
    scratch = tile_scratch(m)
    kept_w, dropped_w = scratch[11], scratch[12]
    for a in range(start, stop):
        for b in range(grid.shape[2]):
            load_tile(grid, a, b, w)
            keep, tol = warm_start(w, n, float64_order, scratch)
            if rounds > 0:
                two_opt_tile(w, keep, rounds, tol, kept_w, dropped_w)
            store_tile(keep, out, a, b)


@jit(nogil=True)
def exact_grid(grid, n, float64_order, out, start, stop):
    """:func:`exact_tile` on the tiles of rows ``start`` to ``stop`` of the grid, into the
    bool grid ``out``."""
    m = grid.shape[1]
    w = np.empty((m, m))
    scratch = tile_scratch(m)
    for a in range(start, stop):
        for b in range(grid.shape[2]):
            load_tile(grid, a, b, w)
            store_tile(exact_tile(w, n, float64_order, scratch), out, a, b)


@jit(nogil=True)
def rowwise_first_grid(grid, n, float64_order, out, start, stop):
    """Per tile of rows ``start`` to ``stop``: its row-wise best mask (the ``n`` largest of
    every row, ties to the lowest index) if that keeps at most ``n`` in every column, else
    :func:`exact_tile`. Both are optimal: no transposable mask keeps more than the row-wise
    best, so a row-wise best that is transposable is the answer, certified without a search."""
    m = grid.shape[1]
    w = np.empty((m, m))
    scratch = tile_scratch(m)
    rowwise = np.empty((m, m), np.bool_)
    column_count = np.empty(m, np.int64)
    for a in range(start, stop):
        for b in range(grid.shape[2]):
            load_tile(grid, a, b, w)
            column_count[:] = 0
            for i in range(m):
                for q in range(m):
                    value = w[i, q]
                    above = 0
                    for p in range(m):
                        above += (w[i, p] > value) | ((w[i, p] == value) & (p < q))
                    rowwise[i, q] = above < n
                    column_count[q] += above < n
            if column_count.max() <= n:
                store_tile(rowwise, out, a, b)
            else:
                store_tile(exact_tile(w, n, float64_order, scratch), out, a, b)


@jit(inline="always")
def half_sums(row_sums, choices, first, total):
    """``total[b]`` = the sum over rows ``first + i`` of ``row_sums[first + i, choices[i], b]``
    (one half of a tile pattern, for every tile b of a row of tiles)."""
    for b in range(total.shape[0]):
        total[b] = 0.0
    for i in range(choices.shape[0]):
        row_sum = row_sums[first + i, choices[i]]
        for b in range(total.shape[0]):
            total[b] += row_sum[b]


@jit(nogil=True)
def exhaustive_grid(grid, row_choices, top_rows, top_bucket, bottom_rows, bottom_bucket, out, start, stop):
    """The best of all valid tile patterns for the tiles of rows ``start`` to ``stop`` of
    the grid, into the bool grid ``out`` (all False on entry); see
    ``exhaustive.split_patterns`` for the tables.

    Meet in the middle per tile: every row's sum for every column choice, the best bottom
    rows for every bucket of column counts, then every top with the best bottom of its
    bucket. Sums in float64. The first best pattern (lowest index) wins: strict
    comparisons keep the earliest bottom of each bucket and the earliest top. A row of
    tiles is solved at once, every step a branch-free loop across its tiles, which the
    compiler vectorizes.
    """
    m, across = grid.shape[1], grid.shape[2]
    n, h, choices = row_choices.shape[1], top_rows.shape[1], row_choices.shape[0]
    buckets = 0
    for t in range(top_bucket.shape[0]):
        buckets = max(buckets, top_bucket[t] + 1)
    w = np.empty((m, m, across))
    tile = np.empty((m, m))
    row_sums = np.empty((m, choices, across))
    total = np.empty(across)
    best_bottom = np.empty((buckets, across))
    best_bottom_index = np.empty((buckets, across), np.int64)
    best = np.empty(across)
    top = np.empty(across, np.int64)
    for a in range(start, stop):
        peak = 0.0
        for i in range(m):
            for b in range(across):
                for j in range(m):
                    w[i, j, b] = abs(grid[a, i, b, j])
                    peak = max(peak, w[i, j, b])
        if math.frexp(peak)[1] > SCALE_ABOVE:  # rare: let load_tile scale the huge tiles
            for b in range(across):
                load_tile(grid, a, b, tile)
                for i in range(m):
                    for j in range(m):
                        w[i, j, b] = tile[i, j]
        for i in range(m):
            for c in range(choices):
                row_sum = row_sums[i, c]
                for b in range(across):
                    row_sum[b] = 0.0
                for q in range(n):
                    entry = w[i, row_choices[c, q]]
                    for b in range(across):
                        row_sum[b] += entry[b]
        best_bottom[:] = -1.0
        for u in range(bottom_rows.shape[0]):
            bucket = bottom_bucket[u]
            if bucket < 0:
                continue
            half_sums(row_sums, bottom_rows[u], h, total)
            for b in range(across):
                better = total[b] > best_bottom[bucket, b]
                best_bottom[bucket, b] = total[b] if better else best_bottom[bucket, b]
                best_bottom_index[bucket, b] = u if better else best_bottom_index[bucket, b]
        best[:] = -1.0
        for t in range(top_rows.shape[0]):
            bucket = top_bucket[t]
            if bucket < 0:
                continue
            half_sums(row_sums, top_rows[t], 0, total)
            for b in range(across):
                pair = total[b] + best_bottom[bucket, b]
                better = pair > best[b]
                best[b] = pair if better else best[b]
                top[b] = t if better else top[b]
        for b in range(across):
            bottom = best_bottom_index[top_bucket[top[b]], b]
            for i in range(m):
                c = top_rows[top[b], i] if i < h else bottom_rows[bottom, i - h]
                for q in range(n):
                    out[a, i, b, row_choices[c, q]] = True
