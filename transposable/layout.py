"""Weight tensors <-> the tiles and groups the solvers work on, and the one tiling rule.

A weight of shape ``(out, in)`` (``nn.Linear``) or ``(out, in, *kernel)`` (``nn.Conv``)
is seen as ``T`` matrices of shape ``(out, in)``, one per kernel tap. Row-wise groups run
along ``in``; transposable ``m x m`` tiles cover ``(out, in)``.
"""
import math

import numpy as np

from .solvers import is_torch

_AXIS_NAMES = {0: "out", 1: "in"}

#: What to do about a dimension that does not tile, for the mask functions.
PAD_HINT = "pass pad=True (--pad) to pad it with zeros, solve, and crop the mask"


class TilingError(ValueError):
    """A weight dimension that must be a multiple of M is not.

    Parameters
    ----------
    axis : int
        0 (``out``) or 1 (``in``).
    size : int
        The dimension's size.
    m : int
        The group or tile size it must be a multiple of.
    hint : str, optional
        Advice appended to the message (how to proceed).

    Attributes
    ----------
    axis : int
        0 (``out``) or 1 (``in``).
    size : int
        The dimension's size.
    m : int
        The group or tile size it must be a multiple of.
    reason : str
        The message without the advice, e.g. for reports.

    Examples
    --------
    >>> error = TilingError(0, 10, 4)
    >>> isinstance(error, ValueError), error.reason
    (True, "weight dimension 'out' (axis 0) has size 10, not a multiple of m=4")
    """

    def __init__(self, axis, size, m, hint=PAD_HINT):
        self.axis, self.size, self.m = axis, size, m
        self.reason = (f"weight dimension '{_AXIS_NAMES[axis]}' (axis {axis}) has size {size}, "
                       f"not a multiple of m={m}")
        super().__init__(f"{self.reason}; {hint}" if hint else self.reason)


def tiling_error(shape, m, *, transposable, hint=PAD_HINT):
    """The :class:`TilingError` a weight of ``shape`` meets at group/tile size ``m``, or None.

    Row-wise N:M cuts ``in`` (axis 1) into groups of ``m``; transposable N:M also cuts
    ``out`` (axis 0), into ``m x m`` tiles. This is the library's one tiling rule: the mask
    functions, ``convert``, ``sparsify``, ``adaprune`` and ``mask_diversity`` all ask it.

    Parameters
    ----------
    shape : tuple of int
        ``(out, in, *kernel)``.
    m : int
        Group / tile size.
    transposable : bool
        Check ``out`` too.
    hint : str, optional
        Advice appended to the message.

    Returns
    -------
    TilingError or None
        The error to raise (not raised here), or None if the shape tiles.

    Examples
    --------
    >>> tiling_error((8, 12), 4, transposable=True) is None
    True
    >>> tiling_error((10, 12), 4, transposable=True).reason
    "weight dimension 'out' (axis 0) has size 10, not a multiple of m=4"
    >>> tiling_error((10, 12), 4, transposable=False) is None
    True
    """
    for axis in ((0, 1) if transposable else (1,)):
        if shape[axis] % m:
            return TilingError(axis, shape[axis], m, hint)
    return None


class Layout:
    """How one weight shape is cut into groups ``(G, m)`` or a tile grid ``(A, m, B, m)``.

    Parameters
    ----------
    shape : tuple of int
        Weight shape ``(out, in, *kernel)``.
    m : int
        Group / tile size.
    transposable : bool
        Tiles (both ``out`` and ``in`` cut by ``m``) instead of groups along ``in``.
    pad : bool
        Pad the cut dimensions with zeros to a multiple of ``m`` instead of raising.

    Raises
    ------
    TilingError
        If a cut dimension is not a multiple of ``m`` and ``pad`` is False.

    Examples
    --------
    >>> import numpy as np
    >>> layout = Layout((8, 12), 4, transposable=True, pad=False)
    >>> layout.blocks(np.zeros((8, 12))).shape  # a tile grid: tile (a, b) is grid[a, :, b, :]
    (2, 4, 3, 4)
    >>> Layout((6, 12), 4, transposable=True, pad=True).padded
    (8, 12)
    """

    def __init__(self, shape, m, *, transposable, pad):
        self.shape = tuple(shape)
        self.m = m
        self.transposable = transposable
        self.taps = math.prod(self.shape[2:])
        error = tiling_error(self.shape, m, transposable=transposable)
        if error is not None and not pad:
            raise error
        padded = list(self.shape[:2])
        for axis in ((0, 1) if transposable else (1,)):
            padded[axis] = -(-self.shape[axis] // m) * m
        self.padded = tuple(padded)

    def blocks(self, weight):
        """Cut a weight (NumPy or torch) into groups ``(G, m)`` or, if transposable, a tile
        grid ``(A, m, B, m)`` whose tile ``(a, b)`` is ``grid[a, :, b, :]`` (for an
        unpadded 2-D weight this is a view, no copy)."""
        out, inp = self.shape[:2]
        m = self.m
        mats = _permute(weight, (*range(2, weight.ndim), 0, 1)).reshape(self.taps, out, inp)
        if self.padded != (out, inp):
            mats = _pad(mats, self.padded[0] - out, self.padded[1] - inp)
        out_p, in_p = self.padded
        if not self.transposable:
            return mats.reshape(-1, m)
        return mats.reshape(self.taps * out_p // m, m, in_p // m, m)

    def unblock(self, blocks):
        """Inverse of ``blocks``: back to the weight's shape, padding cropped."""
        out, inp = self.shape[:2]
        out_p, in_p = self.padded
        mats = blocks.reshape(self.taps, out_p, in_p)[:, :out, :inp]
        full = mats.reshape(*self.shape[2:], out, inp)
        nd = len(self.shape)
        return _permute(full, (nd - 2, nd - 1, *range(nd - 2))).reshape(self.shape)

    def edge_tiles(self):
        """Grid indices ``(a, b)`` of the tiles that padding cut into (empty if none).

        Such a tile holds real entries only in its top-left ``r x c`` corner. Solving the
        zero-padded ``m x m`` tile with exactly ``n`` per row and column would waste kept
        slots on padding (a 3x3 corner at 2:4 could keep 5, not 6), so ``solve_grid``
        solves these tiles as "at most ``n`` per real row and column" instead.
        """
        rows, cols = self.padded[0] // self.m, self.padded[1] // self.m
        cut_rows = self.padded[0] != self.shape[0]
        cut_cols = self.padded[1] != self.shape[1]
        a, b = np.meshgrid(np.arange(self.taps * rows), np.arange(cols), indexing="ij")
        edge = ((a % rows == rows - 1) & cut_rows) | ((b == cols - 1) & cut_cols)
        return a[edge], b[edge]

    def solve_grid(self, engine, grid, n, edge_engine):
        """``engine.solve(grid, n)``, with the edge tiles solved as "at most ``n`` per real
        row and column" (see :meth:`edge_tiles`) by ``edge_engine``.

        An ``r x c`` edge tile, zero-padded to ``m x m``, is embedded in an
        ``(m + n) x (m + n)`` zero tile and solved with exactly ``n`` per row and column:
        the ``n`` or more extra rows and columns take up whatever the real rows and columns
        do not keep, so every mask with at most ``n`` per real row and column extends to a
        feasible one at no cost, and the best extended mask crops to the best such mask.
        """
        mask = engine.solve(grid, n)
        if not self.transposable or self.padded == self.shape[:2]:
            return mask
        a, b = self.edge_tiles()
        if is_torch(grid):
            import torch

            a, b = torch.as_tensor(a, device=grid.device), torch.as_tensor(b, device=grid.device)
        tiles = grid[a, :, b, :]
        m = self.m
        embedded = tiles.new_zeros((len(a), m + n, m + n)) if is_torch(tiles) else np.zeros(
            (len(a), m + n, m + n), dtype=tiles.dtype)
        embedded[:, :m, :m] = tiles
        mask[a, :, b, :] = edge_engine.solve(embedded, n)[:, :m, :m]
        return mask


def _permute(x, axes):
    return x.permute(*axes) if is_torch(x) else x.transpose(axes)


def _pad(mats, rows, cols):
    if is_torch(mats):
        import torch.nn.functional as F

        return F.pad(mats, (0, cols, 0, rows))
    return np.pad(mats, ((0, 0), (0, rows), (0, cols)))
