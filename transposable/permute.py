"""Channel permutations before masking: regroup rows and columns so that the best mask
keeps more of what matters.

An N:M mask judges weights in fixed neighbourhoods: groups of M along ``in`` (row-wise) or
M x M tiles over ``(out, in)`` (transposable). Which rows and columns share a
neighbourhood is an accident of the order the layer was trained in; permuting them first
changes nothing a network computes when the same permutation is folded into the layer that
feeds or reads that dimension (Pool and Yu, 2021), and it can change a great deal of what
the mask keeps, most of all for transposable tiles, which constrain rows and columns.

:func:`find_permutation` searches the permutations of one score matrix;
:func:`permutable_dimensions` and :func:`apply_permutation` find and apply the
permutations of a transformer block that change none of its outputs (the MLP's hidden
dimension and every attention head's value dimension), and :func:`permute_model` does both
for a whole model with magnitude scores. ``prune(..., permute=True)`` searches them on the
calibration scores of every block before pruning it.
"""
import logging
import time
from dataclasses import dataclass

import numpy as np

from .masks import check_flag
from .patterns import parse_pattern
from .solvers._common import is_torch

log = logging.getLogger("transposable")

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
    matrix = _score_matrix(scores)
    check_budget(seconds, max_rounds)
    rows = rows and transposable
    for axis in (0, 1) if transposable else (1,):
        if matrix.shape[axis] % m:
            raise ValueError(f"scores dimension '{('out', 'in')[axis]}' (axis {axis}) has size {matrix.shape[axis]}, "
                             f"not a multiple of m={m}; pass a matrix whose {'dimensions' if transposable else 'rows'} "
                             f"tile")
    _compile()
    identity = kept = _kept(matrix, n, m, transposable)
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
    draws = [_kept(matrix[rng.permutation(matrix.shape[0]) if rows else slice(None)]
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
    _compile()
    begin = time.perf_counter()
    if start is not None:
        order = np.array(start, dtype=np.int64)
        values = _group_values(A, order, m, n, tiles)
    else:
        candidates = [np.arange(A.shape[0]), _balanced_deal(A, m)]
        scored = [(_group_values(A, order, m, n, tiles), order) for order in candidates]
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
        gain = _improve_pairs(A, order, values, pairs, m, n, tiles, candidates, tol).sum()
        quiet = 0 if gain > 0 else quiet + 1
        rounds += 1
    converged = not schedule or (quiet >= len(schedule) and (candidates >= m * m or not tiles))
    return order, float(values.sum()), rounds, converged


def _group_values(A, order, m, n, tiles):
    """The value of every group of ``order`` (float64), on threads over the groups."""
    from .solvers._jit import in_parallel
    from .solvers._permutation_kernels import group_values

    values = np.empty(len(order) // m)
    in_parallel(group_values, len(values), A, order, m, n, tiles, values)
    return values


def _improve_pairs(A, order, values, pairs, m, n, tiles, candidates, tol):
    """One best swap for every pair of groups, in place; returns each pair's gain. On
    threads over the pairs (disjoint: no two threads touch the same group)."""
    from .solvers._jit import in_parallel
    from .solvers._permutation_kernels import improve_pairs

    gains = np.empty(len(pairs))
    in_parallel(improve_pairs, len(pairs), A, order, values, pairs, m, n, tiles, candidates, tol, gains)
    return gains


def _compile():
    """Compile (or load) the search kernels before any clock starts: a first run in a new
    checkout compiles for seconds, which is no search's time."""
    from .solvers._jit import announce_compile

    tiny = (np.zeros((2, 1)), np.arange(2), np.zeros(2), np.array([[0, 1]]), 1, 1, True, 1, 0.0)
    with announce_compile("permutation search"):
        _improve_pairs(*tiny)
        _group_values(tiny[0], tiny[1], 1, 1, True)


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


def _kept(matrix, n, m, transposable):
    """Total score the best mask keeps of ``matrix`` (out, in), float64."""
    return _group_total(matrix if transposable else matrix.T, n, m, transposable)


def _group_total(A, n, m, tiles):
    """Total value of the groups of ``m`` consecutive rows of ``A``."""
    return float(_group_values(np.ascontiguousarray(A, dtype=np.float64), np.arange(A.shape[0]), m, n, tiles).sum())


def _score_matrix(scores):
    """``scores`` as a float64 NumPy matrix, checked."""
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


#: MLPs whose hidden dimension may be permuted: (layers writing it, layers reading it),
#: relative to one parent module; between them only elementwise functions (activation,
#: gating product, dropout).
MLP_LAYOUTS = (
    (("gate_proj", "up_proj"), ("down_proj",)),  # Llama, Mistral, Qwen2, Gemma, SmolLM
    (("c_fc",), ("c_proj",)),  # GPT-2 (Conv1D)
    (("fc1",), ("fc2",)),  # OPT, Phi, CLIP, ViT
    (("dense_h_to_4h",), ("dense_4h_to_h",)),  # GPT-NeoX, Falcon
    (("intermediate.dense",), ("output.dense",)),  # BERT, RoBERTa
)

#: Attention modules whose per-head value dimension may be permuted: (value layer, output
#: layer, slice of the value layer's outputs that hold the values: None for all, or
#: (start, stop) in thirds of a fused q/k/v layer).
HEAD_LAYOUTS = (
    ("v_proj", "o_proj", None),  # Llama, Mistral, Qwen2, Gemma
    ("v_proj", "out_proj", None),  # OPT, BART, CLIP
    ("c_attn", "c_proj", (2, 3)),  # GPT-2: fused q, k, v
    ("self.value", "output.dense", None),  # BERT, RoBERTa
)


@dataclass
class Dimension:
    """A dimension of a model that can be permuted without changing its outputs.

    Parameters
    ----------
    name : str
        The module holding it and what it is: ``"model.layers.0.mlp (mlp)"`` for an MLP's
        hidden dimension, ``"model.layers.0.self_attn (values)"`` for the heads' values.
    size : int
        Its length ``D``.
    block : int
        Permutations stay within consecutive blocks of this length (a head's value
        dimension: ``head_dim``; an MLP: ``size``).
    members : list of (str, nn.Module, int, ndarray)
        ``(layer name, layer, axis, index)``: the layer's weight, in the ``(out, in)``
        convention, holds the dimension along ``axis`` (0: it writes it, its bias too; 1:
        it reads it); ``index[p]`` is the dimension's coordinate at position ``p`` of that
        axis, or -1 where the position is not part of it (a fused q/k/v layer's q and k).
        A coordinate may appear at several positions (grouped-query attention: a value
        head read by several query heads), always at the same offset within its block.

    Examples
    --------
    >>> import torch
    >>> mlp = torch.nn.ModuleDict({"up_proj": torch.nn.Linear(4, 8), "gate_proj": torch.nn.Linear(4, 8),
    ...                            "down_proj": torch.nn.Linear(8, 4)})
    >>> [(name, axis) for name, _, axis, _ in permutable_dimensions(mlp)[0].members]
    [('gate_proj', 0), ('up_proj', 0), ('down_proj', 1)]
    """

    name: str
    size: int
    block: int
    members: list

    def positions(self, order, axis_index):
        """Where each position of a member's axis takes its entry from.

        Parameters
        ----------
        order : ndarray of int
            The dimension's permutation (``order[i]``: the coordinate placed at ``i``).
        axis_index : ndarray of int
            A member's ``index``.

        Returns
        -------
        ndarray of int64
            ``positions[p]``: the old position whose entry moves to ``p``.

        Examples
        --------
        >>> dim = Dimension("values", 4, 2, [])
        >>> dim.positions(np.array([1, 0, 2, 3]), np.array([-1, 0, 1, 2, 3, 0, 1]))
        array([0, 2, 1, 3, 4, 6, 5])
        """
        moved = np.arange(len(axis_index))
        inside = axis_index >= 0
        moved[inside] += order[axis_index[inside]] - axis_index[inside]
        return moved


@dataclass
class DimensionReport:
    """What :func:`permute_dimension` did.

    Parameters
    ----------
    name : str
        The dimension (:attr:`Dimension.name`).
    layers : dict
        Per member layer name: the relative gain in what its own best mask keeps (None for
        a layer that was permuted but not scored).
    gain : float
        Relative gain in kept score over the dimension's scored layers together.
    gain_random : float
        The same for a random permutation (the control).
    seconds : float
        Search time.
    converged : bool
        Every block of the dimension reached a local optimum.
    order : ndarray of int64, optional
        The permutation applied (``order[i]``: the coordinate placed at ``i``).

    Examples
    --------
    >>> DimensionReport("mlp (mlp)", {"mlp.down_proj": 0.01}, 0.01, 0.0, 0.5, True).gain
    0.01
    """

    name: str
    layers: dict
    gain: float
    gain_random: float
    seconds: float
    converged: bool
    order: np.ndarray = None


def permutable_dimensions(model, prefix=""):
    """The dimensions of ``model`` that permute without changing its outputs.

    An MLP's hidden dimension (rows of the layers that write it, columns of the one that
    reads it) and every attention head's value dimension (rows of the value projection
    within a head, columns of the output projection within every query head that reads
    that value head, so grouped-query attention too). Queries and keys are not permuted:
    rotary embeddings rotate fixed pairs of a head's coordinates by fixed frequencies, so
    only the identity keeps a rotary model's scores. The residual stream is not permuted
    either (one permutation would be shared by every layer of the model).

    Parameters
    ----------
    model : nn.Module
        A model or one of its blocks. Layers are recognised by their names (see
        :data:`MLP_LAYOUTS` and :data:`HEAD_LAYOUTS`); the number of heads comes from
        ``model.config`` or the attention module.
    prefix : str, default ""
        Prepended to the layer names (the block's name in a larger model).

    Returns
    -------
    list of Dimension
        In module order.

    Examples
    --------
    >>> import torch
    >>> block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> permutable_dimensions(block)
    []
    """
    from .prune import linear_weight, prunable

    config = getattr(model, "config", None)
    found = []
    for parent_name, parent in model.named_modules():
        base = ".".join(part for part in (prefix, parent_name) if part)

        def layer(relative):
            try:
                module = parent.get_submodule(relative)
            except AttributeError:
                return None
            return module if prunable(module) and linear_weight(module).dim() == 2 else None

        for writers, readers in MLP_LAYOUTS:
            modules = [layer(name) for name in writers + readers]
            if None in modules:
                continue
            size = linear_weight(modules[0]).shape[0]
            if any(linear_weight(w).shape[0] != size for w in modules[:len(writers)]) or \
                    any(linear_weight(r).shape[1] != size for r in modules[len(writers):]):
                continue
            members = [(f"{base}.{name}" if base else name, module, 0 if i < len(writers) else 1, np.arange(size))
                       for i, (name, module) in enumerate(zip(writers + readers, modules))]
            found.append(Dimension(f"{base or 'model'} (mlp)", size, size, members))
        for value_name, output_name, thirds in HEAD_LAYOUTS:
            value, output = layer(value_name), layer(output_name)
            if value is None or output is None:
                continue
            heads = _heads(parent, config)
            if heads is None:
                continue
            query_heads, value_heads, head_dim = heads
            rows = linear_weight(value).shape[0]
            start, stop = (0, rows) if thirds is None else (rows * thirds[0] // 3, rows * thirds[1] // 3)
            if stop - start != value_heads * head_dim or linear_weight(output).shape[1] != query_heads * head_dim:
                continue
            size = value_heads * head_dim
            writes = np.full(rows, -1)
            writes[start:stop] = np.arange(size)
            per_value = query_heads // value_heads
            reads = np.array([(q // per_value) * head_dim + t for q in range(query_heads) for t in range(head_dim)])
            name = lambda relative: f"{base}.{relative}" if base else relative  # noqa: E731
            found.append(Dimension(f"{base or 'model'} (values)", size, head_dim,
                                   [(name(value_name), value, 0, writes), (name(output_name), output, 1, reads)]))
    return found


def _heads(attention, config):
    """``(query heads, value heads, head_dim)`` of an attention module, or None."""
    def first(*names, source):
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    for source in (config, attention, getattr(attention, "config", None), getattr(attention, "self", None)):
        if source is None:
            continue
        query = first("num_attention_heads", "num_heads", "n_head", source=source)
        if query is None:
            continue
        value = first("num_key_value_heads", source=source) or query
        hidden = first("hidden_size", "embed_dim", "n_embd", "all_head_size", source=source)
        head_dim = first("head_dim", "attention_head_size", source=source) or (hidden // query if hidden else None)
        if head_dim and query % value == 0:
            return query, value, head_dim
    return None


def apply_permutation(dimension, order):
    """Permute a dimension of a model in place: its writers' rows and biases, readers' columns.

    Parameters
    ----------
    dimension : Dimension
        From :func:`permutable_dimensions`.
    order : ndarray of int, shape (dimension.size,)
        ``order[i]`` is the coordinate placed at position ``i``; it must keep every block
        of ``dimension.block`` coordinates in place as a set.

    Returns
    -------
    dict
        Per member layer name, the positions array its axis was permuted by (for moving
        statistics of its inputs or outputs along).

    Raises
    ------
    ValueError
        If ``order`` is not a permutation that keeps the blocks.

    Examples
    --------
    >>> import torch
    >>> mlp = torch.nn.ModuleDict({"fc1": torch.nn.Linear(2, 4), "fc2": torch.nn.Linear(4, 2)})
    >>> x = torch.randn(3, 2)
    >>> before = mlp["fc2"](torch.relu(mlp["fc1"](x)))
    >>> _ = apply_permutation(permutable_dimensions(mlp)[0], np.array([3, 2, 1, 0]))
    >>> torch.allclose(before, mlp["fc2"](torch.relu(mlp["fc1"](x))))
    True
    """
    import torch

    from .prune import linear_weight

    order = np.asarray(order, dtype=np.int64)
    blocks = np.arange(dimension.size) // dimension.block
    if order.shape != (dimension.size,) or not np.array_equal(np.sort(order), np.arange(dimension.size)) \
            or not np.array_equal(blocks[order], blocks):
        raise ValueError(f"order must be a permutation of range({dimension.size}) that keeps each block of "
                         f"{dimension.block} in place, got {order!r}")
    moved = {}
    with torch.no_grad():
        for name, module, axis, index in dimension.members:
            positions = dimension.positions(order, index)
            take = torch.as_tensor(positions, device=module.weight.device)
            weight = linear_weight(module)
            weight.copy_(weight.index_select(axis, take))
            if axis == 0 and getattr(module, "bias", None) is not None:
                module.bias.copy_(module.bias.index_select(0, take))
            moved[name] = positions
    return moved


def dimension_scores(dimension, scores, transposable):
    """The score matrix a dimension's search works on: one row per coordinate.

    Every scored member contributes its scores with the dimension along the rows (a reader's
    columns transposed; a coordinate read at several positions contributes them all side by
    side), each divided by its mean so that every layer weighs alike. For row-wise masks
    only the readers count: a writer's groups run along its inputs, which do not move.

    Parameters
    ----------
    dimension : Dimension
        From :func:`permutable_dimensions`.
    scores : dict
        Layer name -> non-negative scores ``(out, in)`` of the members to count.
    transposable : bool
        Transposable tiles or row-wise groups.

    Returns
    -------
    A : ndarray or None, shape (dimension.size, K)
        None when no scored member counts.
    tiles : bool
        Whether groups are valued by transposable tiles (else by row-wise groups along the
        dimension).

    Examples
    --------
    >>> import torch
    >>> mlp = torch.nn.ModuleDict({"fc1": torch.nn.Linear(4, 8), "fc2": torch.nn.Linear(8, 4)})
    >>> A, tiles = dimension_scores(permutable_dimensions(mlp)[0], {"fc2": np.ones((4, 8))}, False)
    >>> A.shape, tiles
    ((8, 4), False)
    """
    tiles = bool(transposable)
    parts = []
    for name, module, axis, index in dimension.members:
        if name not in scores or (not tiles and axis == 0):
            continue
        oriented = _score_matrix(scores[name]) if axis == 0 else _score_matrix(scores[name]).T
        inside = np.flatnonzero(index >= 0)
        inside = inside[np.argsort(index[inside], kind="stable")]
        copies = len(inside) // dimension.size
        part = oriented[inside].reshape(dimension.size, copies * oriented.shape[1])
        parts.append(part / max(part.mean(), 1e-300))
    return (np.hstack(parts) if parts else None), tiles


def permute_dimension(dimension, scores, pattern, *, transposable=True, seconds=1.0, max_rounds=None, seed=0,
                      priority=None):
    """Search and apply the permutation of one dimension that lets its layers' masks keep more.

    Parameters
    ----------
    dimension : Dimension
        From :func:`permutable_dimensions`.
    scores : dict
        Layer name -> non-negative scores of its weight, ``(out, in)`` (the layers to be
        masked; the other members are permuted but not scored).
    pattern : str or tuple
        The N:M pattern.
    transposable : bool, default True
        Transposable tiles or row-wise groups.
    seconds : float, default 1.0
        Search time budget for the whole dimension (shared by its blocks).
    max_rounds : int, optional
        Round budget per block (reproducible results).
    seed : int, default 0
        Seeds the search and the random control.
    priority : ndarray, shape (dimension.size,), optional
        A weight per coordinate: the groups found are placed by decreasing total weight
        (see :func:`canonical`), for engines that walk the dimension in order.

    Returns
    -------
    DimensionReport
        With ``order`` set; ``None`` fields when nothing counted (no scored layer).

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> mlp = torch.nn.ModuleDict({"fc1": torch.nn.Linear(8, 16), "fc2": torch.nn.Linear(16, 8)})
    >>> dim = permutable_dimensions(mlp)[0]
    >>> report = permute_dimension(dim, {"fc2": mlp["fc2"].weight.abs()}, "2:4", transposable=False, max_rounds=5)
    >>> report.gain >= 0
    True
    """
    pattern = parse_pattern(pattern)
    n, m = pattern.n, pattern.m
    check_budget(seconds, max_rounds)
    start = time.perf_counter()
    A, tiles = dimension_scores(dimension, scores, transposable)
    order = np.arange(dimension.size)
    if A is None or dimension.block % m or (tiles and A.shape[1] % m):
        return DimensionReport(dimension.name, {}, None, None, 0.0, True, order)
    rng = np.random.default_rng(seed)
    converged = True
    blocks = dimension.size // dimension.block
    for b in range(blocks):
        rows = slice(b * dimension.block, (b + 1) * dimension.block)
        left = seconds - (time.perf_counter() - start)
        found, _, _, done = search(A[rows], n, m, tiles=tiles, seconds=max(left, 1e-9) / (blocks - b),
                                   max_rounds=max_rounds, rng=rng)
        order[rows] = canonical(found, m, None if priority is None else priority[rows]) + b * dimension.block
        converged &= done
    shuffled = np.concatenate([rng.permutation(dimension.block) + b * dimension.block for b in range(blocks)])
    value = lambda o: _group_total(A[o], n, m, tiles)  # noqa: E731
    identity, permuted, random = value(np.arange(dimension.size)), value(order), value(shuffled)
    moved_scores = {}
    for name, module, axis, index in dimension.members:
        if name in scores:
            moved_scores[name] = (scores[name], dimension.positions(order, index), axis)
    apply_permutation(dimension, order)
    layers = {}
    for name, (original, positions, axis) in moved_scores.items():
        matrix = _score_matrix(original)
        after = matrix[positions] if axis == 0 else matrix[:, positions]
        before_kept = _kept(matrix, n, m, transposable)
        layers[name] = _kept(after, n, m, transposable) / before_kept - 1 if before_kept > 0 else 0.0
    return DimensionReport(dimension.name, layers, permuted / identity - 1, random / identity - 1,
                           time.perf_counter() - start, converged, order)


def permute_model(model, pattern, *, transposable=True, seconds=1.0, max_rounds=None, seed=0, layers=None):
    """Permute every permutable dimension of a model for magnitude masks, in place.

    For a model about to be masked by magnitude without calibration data (before
    ``tp.nn.sparsify``, or before saving it for ``transposable convert``);
    :func:`transposable.prune.prune` with ``permute=True`` searches on calibration scores
    instead. The model's outputs do not change.

    Parameters
    ----------
    model : nn.Module
        Changed in place.
    pattern : str or tuple
        The N:M pattern the masks will have.
    transposable : bool, default True
        Transposable tiles or row-wise groups.
    seconds : float, default 1.0
        Search budget per dimension.
    max_rounds : int, optional
        Round budget per block of a dimension.
    seed : int, default 0
        Seeds the searches.
    layers : sequence of str, optional
        Names of the layers that will be masked (default: every member that tiles); only
        they are scored, every member is permuted.

    Returns
    -------
    list of DimensionReport
        One per dimension found.

    Raises
    ------
    ValueError
        If the model has no permutable dimension.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.ModuleDict({"fc1": torch.nn.Linear(8, 16), "fc2": torch.nn.Linear(16, 8)})
    >>> x = torch.randn(4, 8)
    >>> before = model["fc2"](torch.relu(model["fc1"](x)))
    >>> reports = permute_model(model, "2:4", max_rounds=5)
    >>> torch.allclose(before, model["fc2"](torch.relu(model["fc1"](x))), atol=1e-6), len(reports)
    (True, 1)
    """
    from .layout import tiling_error
    from .prune import linear_weight

    pattern = parse_pattern(pattern)
    dimensions = permutable_dimensions(model)
    if not dimensions:
        raise ValueError(f"found no permutable dimension in {type(model).__name__}: permutations know the MLPs and "
                         f"attention heads of Llama, GPT-2, BERT, OPT and GPT-NeoX style blocks (layer names in "
                         f"transposable.permute.MLP_LAYOUTS and HEAD_LAYOUTS)")
    reports = []
    for dimension in dimensions:
        scores = {name: linear_weight(module).detach().abs() for name, module, _, _ in dimension.members
                  if (layers is None or name in layers)
                  and tiling_error(tuple(linear_weight(module).shape), pattern.m, transposable=transposable) is None}
        reports.append(permute_dimension(dimension, scores, pattern, transposable=transposable, seconds=seconds,
                                         max_rounds=max_rounds, seed=seed))
    return reports
