"""The channel-permutation search's kernels behind plain NumPy calls, for
:mod:`transposable.permutation` (the kernels, in ``_permutation_kernels.py``, value a group of
rows by the exact transposable tiles or the row-wise groups it makes, and find the best
swap between two groups). Both run on the solvers' thread pool, over disjoint ranges.
"""
import numpy as np


def group_values(A, order, m, n, tiles):
    """The value of every group of ``m`` consecutive rows of ``A[order]`` (float64).

    Parameters
    ----------
    A : ndarray, shape (D, K)
        Non-negative float64 scores, C-contiguous.
    order : ndarray of int64
        A permutation of the rows.
    m, n : int
        The pattern.
    tiles : bool
        Exact transposable tiles, or the ``n`` largest of each column of a group.

    Returns
    -------
    ndarray of float64, shape (D / m,)
        The groups' values, in order.

    Examples
    --------
    >>> A = np.array([[3.0, 1.0], [1.0, 2.0]])
    >>> group_values(A, np.arange(2), 2, 1, False).tolist()  # the largest of each column
    [5.0]
    """
    from ._jit import in_parallel
    from ._permutation_kernels import group_values as kernel

    values = np.empty(len(order) // m)
    in_parallel(kernel, len(values), A, order, m, n, tiles, values)
    return values


def improve_pairs(A, order, values, pairs, m, n, tiles, candidates, tol):
    """One best swap for every pair of groups, applied to ``order`` and ``values`` in place.

    Parameters
    ----------
    A : ndarray, shape (D, K)
        As in :func:`group_values`.
    order : ndarray of int64
        The rows' permutation, changed in place.
    values : ndarray of float64
        Every group's value, kept up to date.
    pairs : ndarray of int64, shape (P, 2)
        Disjoint pairs of groups (no group twice).
    m, n : int
        The pattern.
    tiles : bool
        As in :func:`group_values`.
    candidates : int
        Swaps per pair valued exactly, best first by their bound (``m * m``: all).
    tol : float
        Gains at most this are none.

    Returns
    -------
    ndarray of float64, shape (P,)
        Each pair's gain.

    Examples
    --------
    >>> A = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> order, values = np.arange(4), group_values(A, np.arange(4), 2, 1, False)
    >>> improve_pairs(A, order, values, np.array([[0, 1]]), 2, 1, False, 4, 0.0).tolist(), values.tolist()
    ([2.0], [2.0, 2.0])
    """
    from ._jit import in_parallel
    from ._permutation_kernels import improve_pairs as kernel

    gains = np.empty(len(pairs))
    in_parallel(kernel, len(pairs), A, order, values, pairs, m, n, tiles, candidates, tol, gains)
    return gains


def compile_kernels():
    """Compile (or load from the cache) the kernels now, before any clock starts.

    A first run in a new checkout compiles for seconds, which should be no search's time.

    Examples
    --------
    >>> compile_kernels()
    """
    from ._jit import announce_compile

    tiny = (np.zeros((2, 1)), np.arange(2), np.zeros(2), np.array([[0, 1]]), 1, 1, True, 1, 0.0)
    with announce_compile("permutation search"):
        improve_pairs(*tiny)
        group_values(tiny[0], tiny[1], 1, 1, True)
