"""Channel permutations of one score matrix: the search, on NumPy arrays.

An N:M mask judges weights in fixed neighbourhoods: groups of M along ``in`` (row-wise) or
M x M tiles over ``(out, in)`` (transposable). Which rows and columns share a
neighbourhood is an accident of the order the layer was trained in; permuting them first
changes nothing a network computes when the same permutation is folded into the layer that
feeds or reads that dimension (Pool and Yu, 2021), and it can change a great deal of what
the mask keeps, most of all for transposable tiles, which constrain rows and columns.

:func:`find_permutation` searches the permutations of one score matrix (:func:`search` is
its engine for one axis). Which dimensions of a model may be permuted, and applying a
permutation to its layers, is :mod:`transposable.permute`.
"""
import time
from dataclasses import dataclass

import numpy as np

from .masks import check_flag
from .patterns import parse_pattern
from .solvers import is_torch
from .solvers.permutation import compile_kernels, group_values, improve_pairs

#: Most alternations of the row and column searches (transposable tiles, both permuted).
PASSES = 3

#: Swaps of a pair of groups valued exactly per round, best first by their columns bound.
CANDIDATES = 4


@dataclass
class Permutation:
    """The result of :func:`find_permutation`.

    ``scores[rows][:, columns]`` is the permuted score matrix (NumPy indexing; for a
    tensor, ``scores[rows][:, columns]`` too).

    Parameters
    ----------
    rows, columns : ndarray of int64
        The permutations (``rows[i]`` is the original row placed at position ``i``).
    kept : float
        Total score the best mask keeps after the permutation.
    kept_identity : float
        The same without permuting.
    kept_random : float
        The same after uniformly random permutations of the searched axes (the mean of
        three): the control that a gain is not noise.
    seconds : float
        Search time.
    rounds : int
        Rounds of pairwise group improvement run (over both axes).
    converged : bool
        Whether the search stopped at a local optimum (no swap of two rows of different
        groups gains) rather than at the time or round budget.

    Examples
    --------
    >>> result = Permutation(np.arange(4), np.arange(4), 11.0, 10.0, 9.9, 0.1, 3, True)
    >>> round(result.gain, 3)
    0.1
    """

    rows: np.ndarray
    columns: np.ndarray
    kept: float
    kept_identity: float
    kept_random: float
    seconds: float
    rounds: int
    converged: bool

    @property
    def gain(self):
        """``kept / kept_identity - 1``: the relative gain in kept score."""
        return self.kept / self.kept_identity - 1 if self.kept_identity > 0 else 0.0

    @property
    def gain_over_random(self):
        """``kept / kept_random - 1``."""
        return self.kept / self.kept_random - 1 if self.kept_random > 0 else 0.0


def find_permutation(scores, pattern, *, transposable=True, rows=True, columns=True, seconds=1.0, max_rounds=None,
                     seed=0):
    """Row and column permutations of a score matrix that let the best N:M mask keep more.

    Parameters
    ----------
    scores : ndarray or Tensor, shape (out, in)
        Non-negative importance of every weight (``|W|``, Wanda's ``|W| * ||X_j||``,
        SparseGPT's saliency), in the library's ``(out, in)`` convention: row-wise groups
        run along ``in``, transposable tiles cover ``(out, in)``.
    pattern : str, tuple or Pattern
        ``"2:4"``, ...: ``n`` kept of every ``m``.
    transposable : bool, default True
        Transposable tiles; else row-wise groups along ``in``, for which only the column
        permutation matters (``rows`` is then ignored: the identity is returned).
    rows, columns : bool, default True
        Whether to permute ``out`` and ``in``; the other stays the identity.
    seconds : float, default 1.0
        Time budget of the search (the search also stops at a local optimum).
    max_rounds : int, optional
        Stop after this many rounds per axis: with it, the result does not depend on the
        machine's speed (given ``seed``) unless ``seconds`` runs out first.
    seed : int, default 0
        Seeds the order in which groups are paired, and the random control.

    Returns
    -------
    Permutation
        The permutations, the kept score with and without them and with random ones.

    Raises
    ------
    TypeError, ValueError
        For scores that are not a 2-D float array of non-negative finite numbers, a bad
        pattern, a dimension to permute that is not a multiple of ``m``, or a bad budget.

    Notes
    -----
    The permuted axis is cut into groups of ``m`` consecutive positions (tile rows, or
    row-wise groups). The search starts from the better of the identity and a balanced
    deal (rows sorted by total score, dealt to the groups in a snake order), then improves
    pairs of groups: rounds of a round-robin tournament pair every group with another, and
    each pair takes the best single swap of one of its rows for one of the other's, as
    long as one gains. Candidate swaps are ranked by an upper bound (the ``n`` largest of
    every column of a group: exact for row-wise groups, and a relaxation of the tile
    constraint), the best few are valued by the exact objective (for tiles: the exact
    transposable optimum of every tile, by cycle canceling), and a swap is applied only
    when the exact objective rises. Every pair of a round is disjoint, so a round runs in
    parallel. Once a whole tournament gains nothing, every swap is valued exactly; when
    such a tournament gains nothing, the search has converged to a local optimum: no swap
    of two rows from different groups gains. The result is returned in :func:`canonical`
    order (the groups by their first index, each group sorted), which moves as little as
    its grouping needs. For transposable tiles the row and column searches
    alternate, each on the other's result.

    Cost per round: ``D / m`` pairs, each ranking ``m**2`` swaps in ``O(K m n)`` and valuing
    a few exactly (``O(K / m)`` tile solves), for a ``D x K`` matrix.

    References
    ----------
    Pool and Yu, "Channel Permutations for N:M Sparsity", NeurIPS 2021.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scores = np.abs(rng.standard_normal((32, 32))) ** 3
    >>> result = find_permutation(scores, "2:4", max_rounds=20)
    >>> bool(result.kept >= result.kept_identity), sorted(result.rows) == list(range(32))
    (True, True)
    """
    pattern = parse_pattern(pattern)
    n, m = pattern.n, pattern.m
    check_flag("transposable", transposable)
    check_flag("rows", rows)
    check_flag("columns", columns)
    matrix = score_matrix(scores)
    check_budget(seconds, max_rounds)
    rows = rows and transposable
    for axis in (0, 1) if transposable else (1,):
        if matrix.shape[axis] % m:
            raise ValueError(f"scores dimension '{('out', 'in')[axis]}' (axis {axis}) has size {matrix.shape[axis]}, "
                             f"not a multiple of m={m}; pass a matrix whose {'dimensions' if transposable else 'rows'} "
                             f"tile")
    compile_kernels()
    identity = kept = kept_score(matrix, n, m, transposable)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    orders = [np.arange(matrix.shape[0]), np.arange(matrix.shape[1])]
    axes = [axis for axis, wanted in ((0, rows), (1, columns)) if wanted]
    total_rounds, settled, searched = 0, 0, set()
    # Alternate the axes, each searched on the other's latest order, until a search that
    # reached a local optimum gained nothing on every axis in turn.
    for axis in axes * PASSES:
        left = seconds - (time.perf_counter() - start)
        if settled >= len(axes) or left <= 0:
            break
        problem = matrix[:, orders[1]] if axis == 0 else matrix[orders[0]].T
        order, value, rounds, converged = search(problem, n, m, tiles=transposable, seconds=left / len(axes),
                                                 max_rounds=max_rounds, rng=rng,
                                                 start=orders[axis] if axis in searched else None)
        searched.add(axis)
        total_rounds += rounds
        improved = value > kept * (1 + 1e-12)
        if value >= kept:
            orders[axis], kept = canonical(order, m), value
        settled = (settled + 1 if not improved else 1) if converged else 0
    draws = [kept_score(matrix[rng.permutation(matrix.shape[0]) if rows else slice(None)]
                   [:, rng.permutation(matrix.shape[1]) if columns else slice(None)], n, m, transposable)
             for _ in range(3)]
    return Permutation(orders[0], orders[1], float(kept), float(identity), float(np.mean(draws)),
                       time.perf_counter() - start, total_rounds, settled >= len(axes))


def search(A, n, m, *, tiles, seconds, max_rounds=None, rng=None, start=None):
    """Permute the rows of ``A`` (D, K) so that groups of ``m`` consecutive rows keep more.

    The engine of :func:`find_permutation` (see its notes), on a matrix whose rows are the
    permuted dimension.

    Parameters
    ----------
    A : ndarray, shape (D, K)
        Non-negative scores; ``D`` and (for ``tiles``) ``K`` multiples of ``m``.
    n, m : int
        The pattern.
    tiles : bool
        Value a group by its exact transposable tiles (else by the ``n`` largest of each
        of its columns: row-wise groups along the permuted axis).
    seconds : float
        Time budget, checked between rounds.
    max_rounds : int, optional
        Round budget.
    rng : numpy.random.Generator, optional
        Pairs the groups (default: seed 0).
    start : ndarray of int, optional
        The order to improve (default: the better of the identity and a balanced deal).

    Returns
    -------
    order : ndarray of int64
        ``A[order]`` is the permuted matrix.
    value : float
        What the best masks keep of it.
    rounds : int
        Rounds run.
    converged : bool
        Whether it stopped at a local optimum.

    Examples
    --------
    >>> A = np.array([[9., 8, 0, 0], [9, 8, 0, 0], [0, 0, 9, 8], [0, 0, 9, 8]] * 2)
    >>> search(A, 1, 2, tiles=False, seconds=1e-9, start=np.arange(8))[1]  # no time for a round: as given
    68.0
    >>> order, value, rounds, converged = search(A, 1, 2, tiles=False, seconds=1.0)
    >>> value, converged
    (136.0, True)
    """
    A = np.ascontiguousarray(A, dtype=np.float64)
    rng = np.random.default_rng(0) if rng is None else rng
    groups = A.shape[0] // m
    compile_kernels()
    begin = time.perf_counter()
    if start is not None:
        order = np.array(start, dtype=np.int64)
        values = group_values(A, order, m, n, tiles)
    else:
        candidates = [np.arange(A.shape[0]), _balanced_deal(A, m)]
        scored = [(group_values(A, order, m, n, tiles), order) for order in candidates]
        values, order = max(scored, key=lambda pair: pair[0].sum())
    schedule = _round_robin(groups, rng)
    tol = 1e-12 * max(float(values.sum()), 1e-300)
    # Tiles: swaps ranked by their bound, a few valued exactly; once a whole tournament
    # gains nothing that way, every swap is valued exactly until a tournament gains nothing.
    candidates = CANDIDATES if tiles else 1
    rounds = quiet = 0
    while schedule:
        if quiet >= len(schedule):
            if candidates >= m * m or not tiles:
                break
            candidates, quiet = m * m, 0
        if (max_rounds is not None and rounds >= max_rounds) or time.perf_counter() - begin >= seconds:
            break
        pairs = schedule[rounds % len(schedule)]
        gain = improve_pairs(A, order, values, pairs, m, n, tiles, candidates, tol).sum()
        quiet = 0 if gain > 0 else quiet + 1
        rounds += 1
    converged = not schedule or (quiet >= len(schedule) and (candidates >= m * m or not tiles))
    return order, float(values.sum()), rounds, converged


def canonical(order, m, priority=None):
    """The same grouping, moved as little as it needs: members sorted, groups by first member.

    What a mask keeps depends on which coordinates share a group, not on where the groups
    or their members lie; but an engine that walks the coordinates in order (SparseGPT
    prunes the columns of a layer left to right, spreading each error to the columns still
    to come) should see them in an order close to the model's own.

    Parameters
    ----------
    order : ndarray of int
        A permutation whose consecutive ``m`` positions form the groups.
    m : int
        The group size.
    priority : ndarray, optional
        A weight per coordinate: the groups are then placed by decreasing total weight
        (ties by their first coordinate).

    Returns
    -------
    ndarray of int64
        The canonical permutation with the same groups.

    Examples
    --------
    >>> canonical(np.array([7, 2, 5, 0, 6, 1, 3, 4]), 2)
    array([0, 5, 1, 6, 2, 7, 3, 4])
    """
    groups = np.sort(np.asarray(order, dtype=np.int64).reshape(-1, m), axis=1)
    groups = groups[np.argsort(groups[:, 0], kind="stable")]
    if priority is not None:
        groups = groups[np.argsort(-np.asarray(priority)[groups].sum(axis=1), kind="stable")]
    return groups.reshape(-1)


def _round_robin(groups, rng):
    """The rounds of a round-robin tournament between ``groups`` (circle method, players
    shuffled by ``rng``): every round pairs disjoint groups, and every pair of groups meets
    once over all rounds. Each round is an int64 array (pairs, 2)."""
    players = list(rng.permutation(groups)) + ([-1] if groups % 2 else [])
    rounds = []
    for _ in range(len(players) - 1):
        half = len(players) // 2
        pairs = [(players[i], players[-1 - i]) for i in range(half) if -1 not in (players[i], players[-1 - i])]
        rounds.append(np.array(pairs, dtype=np.int64).reshape(-1, 2))
        players = [players[0], players[-1], *players[1:-1]]
    return [pairs for pairs in rounds if len(pairs)]


def _balanced_deal(A, m):
    """Rows sorted by total score, dealt to the groups in a snake order (1, 2, ..., G, G,
    ..., 1, ...): every group gets one row of every stratum of weight."""
    groups = A.shape[0] // m
    ranked = np.argsort(-A.sum(axis=1), kind="stable")
    slots = np.empty(A.shape[0], dtype=np.int64)
    for rank, row in enumerate(ranked):
        lap, place = divmod(rank, groups)
        group = place if lap % 2 == 0 else groups - 1 - place
        slots[group * m + lap] = row
    return slots


def kept_score(matrix, n, m, transposable):
    """Return the total score the best N:M mask keeps of ``matrix``.

    Parameters
    ----------
    matrix : ndarray, shape (out, in)
        Non-negative float64 scores.
    n, m : int
        The pattern.
    transposable : bool
        Transposable tiles, or row-wise groups along ``in``.

    Returns
    -------
    float
        The kept total, float64.

    Examples
    --------
    >>> kept_score(np.array([[1.0, 2.0], [3.0, 4.0]]), 1, 2, transposable=False)
    6.0
    """
    return group_total(matrix if transposable else matrix.T, n, m, transposable)


def group_total(A, n, m, tiles):
    """Return the total value of the groups of ``m`` consecutive rows of ``A`` (see :func:`search`).

    Parameters
    ----------
    A : ndarray, shape (D, K)
        Non-negative scores.
    n, m : int
        The pattern.
    tiles : bool
        Exact transposable tiles, or the ``n`` largest of each column of a group.

    Returns
    -------
    float
        The sum of the groups' values.

    Examples
    --------
    >>> group_total(np.array([[1.0, 2.0], [3.0, 4.0]]), 1, 2, tiles=True)
    5.0
    """
    return float(group_values(np.ascontiguousarray(A, dtype=np.float64), np.arange(A.shape[0]), m, n, tiles).sum())


def score_matrix(scores):
    """Check ``scores`` and return them as a float64 NumPy matrix.

    Parameters
    ----------
    scores : ndarray or Tensor, shape (out, in)
        Non-negative finite floats.

    Returns
    -------
    ndarray of float64
        A new array.

    Raises
    ------
    TypeError
        If ``scores`` is not a float array or tensor.
    ValueError
        If it is not a matrix, or holds NaN, Inf or a negative value.

    Examples
    --------
    >>> score_matrix(np.ones((2, 2), dtype=np.float32)).dtype
    dtype('float64')
    """
    if is_torch(scores):
        scores = scores.detach().cpu().double().numpy()
    if not isinstance(scores, np.ndarray) or scores.dtype.kind != "f":
        raise TypeError(f"scores must be a float ndarray or Tensor, got {type(scores).__name__}"
                        f"{'' if not isinstance(scores, np.ndarray) else ' of dtype ' + str(scores.dtype)}")
    if scores.ndim != 2:
        raise ValueError(f"scores must be a matrix (out, in), got shape {scores.shape}")
    matrix = scores.astype(np.float64)
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError("scores must be finite and non-negative (e.g. abs(weight)); got NaN, Inf or a negative value")
    return matrix


def check_budget(seconds, max_rounds):
    """Raise ``ValueError`` unless a search budget is valid.

    Parameters
    ----------
    seconds : float
        Must be positive.
    max_rounds : int or None
        A positive integer, or None.

    Raises
    ------
    ValueError
        Naming the argument and its value.

    Examples
    --------
    >>> check_budget(0, None)
    Traceback (most recent call last):
    ...
    ValueError: seconds must be a positive number, got seconds=0
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"seconds must be a positive number, got seconds={seconds!r}")
    if max_rounds is not None and (isinstance(max_rounds, bool) or not isinstance(max_rounds, (int, np.integer))
                                   or max_rounds < 1):
        raise ValueError(f"max_rounds must be a positive integer or None, got max_rounds={max_rounds!r}")
