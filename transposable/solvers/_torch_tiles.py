"""The greedy and cycle-canceling tile solvers in torch, vectorized over tiles, so that
a mask is refreshed on the weight's own device (no Python API here; see ``greedy.py``
and ``cyclecanceling.py``, whose numba kernels in ``_tile_kernels.py`` these follow step
for step). Every loop below runs over positions inside a tile (at most m**2 steps), never
over tiles.
"""
import torch

from ._common import SCALE_ABOVE

#: Tiles per chunk in the (tiles, m, m, m) min-plus products, bounding their memory.
CHUNK_ENTRIES = 2**26


def magnitudes(tiles):
    """``|tiles|`` (K, m, m) to solve on: float64, except float32 on GPUs for 16- and 32-bit
    inputs (float64 is slow there), so entries are ordered in the input's own precision. As
    the numba ``load_tile``, a tile whose peak is at least ``2**SCALE_ABOVE`` (float64) or
    ``2**64`` (float32) is scaled by a power of two (exact) so that no sum overflows."""
    wide = tiles.dtype == torch.float64 or tiles.device.type != "cuda"
    w = tiles.abs().to(torch.float64 if wide else torch.float32)
    exponent = torch.frexp(w.reshape(len(w), -1).amax(dim=1)).exponent
    huge = exponent > (SCALE_ABOVE if wide else 64)
    if bool(huge.any()):
        w[huge] = w[huge] * torch.pow(2.0, -exponent[huge].to(w.dtype))[:, None, None]
    return w


def greedy_pass(w, n):
    """Hubara et al.'s greedy on every tile: (keep, row_count, col_count)."""
    k, m, _ = w.shape
    order = torch.sort(w.reshape(k, m * m), dim=1, descending=True, stable=True).indices
    keep = torch.zeros(k, m * m, dtype=torch.bool, device=w.device)
    rows = torch.zeros(k, m, dtype=torch.long, device=w.device)
    cols = torch.zeros(k, m, dtype=torch.long, device=w.device)
    tile = torch.arange(k, device=w.device)
    for step in range(m * m):
        q = order[:, step]
        i, j = q // m, q % m
        take = (rows[tile, i] < n) & (cols[tile, j] < n)
        keep[tile, q] |= take
        rows[tile, i] += take
        cols[tile, j] += take
    return keep.reshape(k, m, m), rows, cols


def complete(w, n, keep, rows, cols):
    """Fill short rows and columns by the best 3-hop augmenting path, as the numba
    ``complete_tile`` does (which says why such a path always exists)."""
    m = w.shape[1]
    while True:
        short = rows < n
        todo = short.any(dim=1).nonzero().squeeze(1)
        if todo.numel() == 0:
            return keep
        wt, kt = w[todo], keep[todo]
        start = short[todo].long().argmax(dim=1)  # first short row, as the numba loop
        arange = torch.arange(len(todo), device=w.device)
        start_row_w, start_row_keep = wt[arange, start], kt[arange, start]
        # gain[t, c, c1, r1] = w[start, c1] - w[r1, c1] + w[r1, c], valid only when c is
        # short, (start, c1) dropped, (r1, c1) kept and (r1, c) dropped.
        col_short = cols[todo] < n
        kt_t = kt.transpose(1, 2)  # [t, col, row]
        wt_t = wt.transpose(1, 2)
        valid = (col_short[:, :, None, None] & ~start_row_keep[:, None, :, None]
                 & kt_t[:, None, :, :] & ~kt_t[:, :, None, :])
        gain = start_row_w[:, None, :, None] - wt_t[:, None, :, :] + wt_t[:, :, None, :]
        gain = torch.where(valid, gain, torch.full_like(gain, -torch.inf))
        best = gain.reshape(len(todo), -1).argmax(dim=1)
        c, c1, r1 = best // (m * m), best // m % m, best % m
        keep[todo, start, c1] = True
        keep[todo, r1, c1] = False
        keep[todo, r1, c] = True
        rows[todo, start] += 1
        cols[todo, c] += 1


def row_graph(w, keep):
    """Hop costs and columns of the row graph (see ``cancel_negative_cycles``):
    ``cost[t, i, k] = min_j kept_w[t, k, j] - dropped_w[t, i, j]``."""
    k, m, _ = w.shape
    kept_w = torch.where(keep, w, torch.full_like(w, torch.inf))
    dropped_w = torch.where(keep, torch.full_like(w, -torch.inf), w)
    cost = torch.empty(k, m, m, dtype=w.dtype, device=w.device)
    column = torch.empty(k, m, m, dtype=torch.long, device=w.device)
    step = max(1, CHUNK_ENTRIES // m**3)
    for lo in range(0, k, step):
        hops = kept_w[lo:lo + step, None, :, :] - dropped_w[lo:lo + step, :, None, :]
        cost[lo:lo + step], column[lo:lo + step] = hops.min(dim=3)
    return cost, column


def pair_hop(w, keep, i, k):
    """Cost and column of hop row i -> row k in every tile: O(m) per tile."""
    kept_w = torch.where(keep[:, k], w[:, k], torch.full_like(w[:, k], torch.inf))
    dropped_w = torch.where(keep[:, i], torch.full_like(w[:, i], -torch.inf), w[:, i])
    return (kept_w - dropped_w).min(dim=1)


def two_opt(w, keep, rounds, tol):
    """Row-pair swaps (negative 2-cycles of the row graph), pair by pair in the numba
    kernel's order, every tile at once."""
    m = w.shape[1]
    for _ in range(rounds):
        improved = False
        for i in range(m):
            for k in range(i + 1, m):
                cost_ik, j = pair_hop(w, keep, i, k)
                cost_ki, l = pair_hop(w, keep, k, i)
                t = (cost_ik + cost_ki < -tol).nonzero().squeeze(1)
                if t.numel() == 0:
                    continue
                keep[t, i, j[t]] = True
                keep[t, k, j[t]] = False
                keep[t, k, l[t]] = True
                keep[t, i, l[t]] = False
                improved = True
        if not improved:
            break
    return keep


def pred_cycle_node(pred):
    """Per tile, a row on a cycle of the predecessor graph, or -1: after m steps back
    from every row, a walk that has not left the graph (pred -1) is on a cycle."""
    m = pred.shape[1]
    v = torch.arange(m, device=pred.device).expand_as(pred).clone()
    for _ in range(m):
        v = torch.where(v >= 0, pred.gather(1, v.clamp(min=0)), v)
    on_cycle = v >= 0
    return torch.where(on_cycle.any(dim=1), v.gather(1, on_cycle.long().argmax(dim=1, keepdim=True)).squeeze(1),
                       torch.full_like(v[:, 0], -1))


def cancel_negative_cycles(w, keep, tol):
    """Bellman-Ford on every tile's row graph at once (synchronous passes); each round
    cancels one negative cycle in every tile that has one, until none has. As in the
    numba kernel, a tile's passes stop when nothing relaxes (optimal) or its predecessor
    graph has a cycle, which is then negative (see ``cancel_negative_cycles`` there; the
    argument holds for synchronous passes too)."""
    m = w.shape[1]
    todo = torch.arange(w.shape[0], device=w.device)
    while todo.numel():
        cost, column = row_graph(w[todo], keep[todo])
        tol_t = tol[todo][:, None]
        dist = torch.zeros(len(todo), m, dtype=w.dtype, device=w.device)
        pred = torch.full((len(todo), m), -1, dtype=torch.long, device=w.device)
        searching = torch.ones(len(todo), dtype=torch.bool, device=w.device)
        start = torch.full((len(todo),), -1, dtype=torch.long, device=w.device)
        while bool(searching.any()):
            best, via = (dist[:, :, None] + cost).min(dim=1)
            improving = (best < dist - tol_t) & searching[:, None]
            dist = torch.where(improving, best, dist)
            pred = torch.where(improving, via, pred)
            found = pred_cycle_node(pred)
            start = torch.where(searching, found, start)
            searching &= improving.any(dim=1) & (found < 0)
        cyclic = start >= 0
        todo, column, pred, v = todo[cyclic], column[cyclic], pred[cyclic], start[cyclic]
        rows = torch.arange(len(todo), device=w.device)
        start, live, hops = v, torch.ones(len(todo), dtype=torch.bool, device=w.device), []
        for _ in range(m):  # the cycle's hops, before flipping any
            u = pred[rows, v]
            hops.append((live.clone(), u, v, column[rows, u, v]))
            v = u
            live &= v != start
        for on, u, v, j in hops:
            t = todo[on]
            keep[t, u[on], j[on]] = True
            keep[t, v[on], j[on]] = False
    return keep


def solve(tiles, n, rounds, exact):
    """``solve_grid`` for (K, m, m) torch tiles on their own device."""
    w = magnitudes(tiles)
    keep, rows, cols = greedy_pass(w, n)
    keep = complete(w, n, keep, rows, cols)
    # Above the rounding of an m-hop sum: 1e-12 relative in float64 (as the numba
    # kernels), 1e-6 in float32 (on GPUs).
    tol = (1e-12 if w.dtype == torch.float64 else 1e-6) * w.reshape(len(w), -1).amax(dim=1)
    keep = two_opt(w, keep, rounds, tol)
    return cancel_negative_cycles(w, keep, tol) if exact else keep
