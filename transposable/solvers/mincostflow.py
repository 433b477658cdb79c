"""Exact transposable masks by min-cost flow (OR-Tools ``SimpleMinCostFlow``).

One tile is a max-weight b-matching on the complete bipartite graph rows x columns: each
tile row node supplies ``n`` units, each tile column node demands ``n``, and every entry is
an arc row -> column of capacity 1 and cost ``-|w|``. The flow polytope is integral, so the
optimal flow is the optimal mask. Many tiles share one solver call as disjoint subgraphs.
"""
import numpy as np

from ._common import always, as_tiles, shaped_like

ACCEPTS_TORCH = False
EXACT = True
supports = always

#: Integer resolution of the costs: ``|w|`` is scaled so that the tile's largest entry maps
#: to ``COST_SCALE``, then rounded.
COST_SCALE = 2**30

#: Arcs per OR-Tools call. Batching saves Python overhead on small tiles, but very large
#: graphs run slower per arc (measured best between 2**14 and 2**16 at 2:4 to 8:16).
ARCS_PER_CALL = 2**15


class MinCostFlowError(RuntimeError):
    """OR-Tools did not report an optimal flow.

    Re-exported as ``transposable.MinCostFlowError``, so that callers need not import
    ``transposable.solvers`` to catch it.

    Examples
    --------
    >>> import transposable
    >>> transposable.MinCostFlowError is MinCostFlowError
    True
    """


def solve(tiles, n, *, arcs_per_call=ARCS_PER_CALL):
    """Optimal transposable N:M masks of a batch of tiles.

    Parameters
    ----------
    tiles : ndarray, shape (K, m, m) or (A, m, B, m)
        Weights: a batch of tiles, or a tile grid whose tile ``(a, b)`` is
        ``tiles[a, :, b, :]``. The mask maximises the kept sum of their magnitudes.
    n : int
        Entries kept in every tile row and every tile column, ``0 < n < m``.
    arcs_per_call : int, optional
        How many arcs (``K * m * m`` in all) go into one OR-Tools call.

    Returns
    -------
    ndarray of bool
        True where an entry is kept; same shape as ``tiles``.

    Raises
    ------
    MinCostFlowError
        If OR-Tools reports any status other than OPTIMAL.

    Notes
    -----
    Exact up to the integer scaling of the costs: each tile's magnitudes are divided by
    the tile's maximum (in float64, whatever the input's dtype) and rounded to multiples of
    ``1 / COST_SCALE``, so the kept sum of
    a returned tile is within ``n * m * max|w_tile| / COST_SCALE`` (below ``5e-7 * max|w|``
    for 16:32) of the optimum. Cost per tile is that of OR-Tools' cost-scaling
    push-relabel on ``2m`` nodes and ``m**2`` arcs.

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
    weights = np.abs(np.asarray(as_tiles(tiles), dtype=np.float64))  # scaled in float64: see Notes
    k, m, _ = weights.shape
    mask = np.empty(weights.shape, dtype=bool)
    tiles_per_call = max(1, arcs_per_call // (m * m))
    for start in range(0, k, tiles_per_call):
        batch = weights[start:start + tiles_per_call]
        mask[start:start + len(batch)] = _solve_batch(batch, n)
    return shaped_like(mask, tiles)


def _solve_batch(weights, n):
    from ortools.graph.python import min_cost_flow  # imported only when this method runs

    k, m, _ = weights.shape
    peak = weights.reshape(k, -1).max(axis=1)
    peak[peak == 0] = 1.0  # an all-zero tile: every mask is optimal
    costs = -np.rint(weights / peak[:, None, None] * COST_SCALE).astype(np.int64)

    # Node ids: tile t's rows are 2mt .. 2mt+m-1, its columns 2mt+m .. 2mt+2m-1.
    tile_base = (2 * m * np.arange(k, dtype=np.int32))[:, None, None]
    i = np.arange(m, dtype=np.int32)[None, :, None]
    j = np.arange(m, dtype=np.int32)[None, None, :]
    tails = np.broadcast_to(tile_base + i, (k, m, m)).ravel()
    heads = np.broadcast_to(tile_base + m + j, (k, m, m)).ravel()

    flow = min_cost_flow.SimpleMinCostFlow()
    arcs = flow.add_arcs_with_capacity_and_unit_cost(
        tails, heads, np.ones(tails.size, dtype=np.int64), costs.ravel())
    supplies = np.tile(np.repeat(np.array([n, -n], dtype=np.int64), m), k)
    flow.set_nodes_supplies(np.arange(2 * m * k, dtype=np.int32), supplies)
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise MinCostFlowError(
            f"OR-Tools min-cost flow ended with status {status!r}, not OPTIMAL, on a batch of "
            f"{k} tiles of {m}x{m} at n={n}")
    return (flow.flows(np.asarray(arcs, dtype=np.int32)) > 0).reshape(k, m, m)
