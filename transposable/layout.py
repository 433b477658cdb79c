"""Weight tensors <-> the tiles and groups the solvers work on.

A weight of shape ``(out, in)`` (``nn.Linear``) or ``(out, in, *kernel)`` (``nn.Conv``)
is seen as ``T`` matrices of shape ``(out, in)``, one per kernel tap. Row-wise groups run
along ``in``; transposable ``m x m`` tiles cover ``(out, in)``.
"""
import math

import numpy as np

from solvers._common import is_torch

_AXIS_NAMES = {0: "out", 1: "in"}


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
    ValueError
        If a cut dimension is not a multiple of ``m`` and ``pad`` is False.
    """

    def __init__(self, shape, m, *, transposable, pad):
        self.shape = tuple(shape)
        self.m = m
        self.transposable = transposable
        self.taps = math.prod(self.shape[2:])
        cut_axes = (0, 1) if transposable else (1,)
        padded = list(self.shape[:2])
        for axis in cut_axes:
            size = self.shape[axis]
            if size % m:
                if not pad:
                    raise ValueError(
                        f"weight dimension '{_AXIS_NAMES[axis]}' (axis {axis}) has size {size}, "
                        f"not a multiple of m={m}; pass pad=True (--pad) to pad it with zeros, "
                        f"solve, and crop the mask")
                padded[axis] = -(-size // m) * m
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


def _permute(x, axes):
    return x.permute(*axes) if is_torch(x) else x.transpose(axes)


def _pad(mats, rows, cols):
    if is_torch(mats):
        import torch.nn.functional as F

        return F.pad(mats, (0, cols, 0, rows))
    return np.pad(mats, ((0, 0), (0, rows), (0, cols)))
