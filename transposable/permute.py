"""Channel permutations of a model: which dimensions may move without changing its outputs,
and moving them.

:func:`permutable_dimensions` and :func:`apply_permutation` find and apply the
permutations of a transformer block that change none of its outputs (the MLP's hidden
dimension and every attention head's value dimension), :func:`permute_dimension` searches
one on given scores and applies it, and :func:`permute_model` does it for a whole model
with magnitude scores. ``prune(..., permute=True)`` searches them on the calibration scores
of every block before pruning it. The search itself, on one score matrix, is
:mod:`transposable.permutation` (:func:`find_permutation` is importable from here too).
"""
import logging
import time
from dataclasses import dataclass

import numpy as np

from .layers import linear_weight, prunable
from .layout import tiling_error
from .patterns import parse_pattern
from .permutation import (CANDIDATES, PASSES, Permutation, canonical, check_budget,  # noqa: F401  (public here too)
                          find_permutation, group_total, kept_score, score_matrix, search)

log = logging.getLogger("transposable")


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
        oriented = score_matrix(scores[name]) if axis == 0 else score_matrix(scores[name]).T
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
    value = lambda o: group_total(A[o], n, m, tiles)  # noqa: E731
    identity, permuted, random = value(np.arange(dimension.size)), value(order), value(shuffled)
    moved_scores = {}
    for name, module, axis, index in dimension.members:
        if name in scores:
            moved_scores[name] = (scores[name], dimension.positions(order, index), axis)
    apply_permutation(dimension, order)
    layers = {}
    for name, (original, positions, axis) in moved_scores.items():
        matrix = score_matrix(original)
        after = matrix[positions] if axis == 0 else matrix[:, positions]
        before_kept = kept_score(matrix, n, m, transposable)
        layers[name] = kept_score(after, n, m, transposable) / before_kept - 1 if before_kept > 0 else 0.0
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
