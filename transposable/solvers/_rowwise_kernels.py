"""The numba kernel of row-wise N:M masks (no Python API here; see ``rowwise.py``)."""
import numpy as np

from ._jit import jit


@jit(nogil=True)
def keep_largest(groups, n, out, start, stop):
    """``out[g]`` = the ``n`` largest magnitudes of ``groups[g]`` for ``start <= g < stop``,
    ties to the lowest index.

    An entry is kept when fewer than ``n`` entries of its group rank above it (larger, or
    equal and earlier): ``m**2`` branch-free comparisons a group, which the compiler
    vectorizes, and only the bool mask is written.
    """
    m = groups.shape[1]
    magnitude = np.empty(m, groups.dtype)
    for g in range(start, stop):
        for q in range(m):
            magnitude[q] = abs(groups[g, q])
        for q in range(m):
            value = magnitude[q]
            above = 0
            for p in range(m):
                above += (magnitude[p] > value) | ((magnitude[p] == value) & (p < q))
            out[g, q] = above < n
