"""Calibrated one-shot pruning to N:M or transposable N:M, one block at a time.

The layer-wise recipe of SparseGPT and Wanda, with the library's exact masks: capture the
inputs of the model's first block on a little calibration data, then for each block in
turn collect statistics of every prunable layer's inputs, choose each layer's mask from
importance scores, reconstruct what is kept, and run the pruned block to produce the next
block's inputs. Only one block's activations are held at a time, and the model is never
copied, so memory is the model plus one block's worth of calibration activations.

Scores (``score=``):

- ``"magnitude"``: ``|W|``.
- ``"wanda"``: ``|W_ij| * ||X_j||_2`` (Sun et al., 2024): weights times the norm of their
  input feature over the calibration tokens; no reconstruction.
- ``"sparsegpt"``: the optimal-brain-surgeon saliency ``W_ij**2 / [H^-1]_jj**2`` with
  ``H = X^T X`` (Frantar and Alistarh, 2023), masks chosen M columns at a time on the
  weights as already updated, every pruned weight's error spread over the columns not yet
  processed (dampened Cholesky of ``H``).
- ``"adaprune"``: magnitude masks, then the kept weights and bias fitted with Adam so the
  layer's outputs match the dense layer's on the same inputs (Hubara et al., 2021).

Transposable masks fit SparseGPT's column order: the M columns processed together form a
slab of M x M tiles down the rows, whose exact transposable mask is solved on the slab's
scores (the combination TSENOR plugs into layer-wise pruning; Meng et al., 2025).
"""
import fnmatch
import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .io import check_folder
from .layout import tiling_error
from .masks import check_flag, kept_fraction, mask, resolve_method
from .patterns import parse_pattern
from .permute import check_budget, apply_permutation, permutable_dimensions, permute_dimension

log = logging.getLogger("transposable")

SCORES = ("sparsegpt", "wanda", "magnitude", "adaprune")


def check_score(score):
    """Raise ``ValueError`` unless ``score`` is one of :data:`SCORES`.

    Parameters
    ----------
    score : str
        The score's name.

    Raises
    ------
    ValueError
        Naming the score and the choices.

    Examples
    --------
    >>> check_score("obs")
    Traceback (most recent call last):
    ...
    ValueError: unknown score 'obs'; choose from ['sparsegpt', 'wanda', 'magnitude', 'adaprune']
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose from {list(SCORES)}")

#: Where Hugging Face models keep their repeated blocks, tried in this order.
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks",
               "model.language_model.layers", "encoder.layer", "bert.encoder.layer", "roberta.encoder.layer",
               "layers")

#: Layer types whose inputs the scores are defined for; convolutions take magnitude and AdaPrune.
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerReport:
    """What pruning did to one layer.

    Parameters
    ----------
    name : str
        The layer's name in ``model.named_modules()``.
    shape : list of int
        Its weight's shape as stored.
    status : str
        ``"pruned"``, or ``"left dense: <why>"``.
    kept_l1 : float, optional
        Fraction of the original weight's L1 that the mask keeps.
    error_masked : float, optional
        Relative output error ``||f(X; W*S) - f(X; W)||^2 / ||f(X; W)||^2`` on the first
        calibration batch with the mask applied to the original weights.
    error : float, optional
        The same after the score's reconstruction (equal to ``error_masked`` for magnitude
        and Wanda, which change nothing but the mask).
    seconds : float, optional
        Time spent choosing the mask and reconstructing.
    permutation : dict, optional
        How a channel permutation (``permute=True``) moved the layer's weight, ``(out, in)``:
        ``{"axis": 0 or 1, "positions": [...]}``, position ``i`` of that axis now holding
        what position ``positions[i]`` held (with ``axis`` 0 the bias moved alike). None
        if it did not move.
    permutation_gain : float, optional
        Relative gain in the score its best mask keeps from that permutation (None for a
        layer that was permuted but not scored, e.g. left dense).
    permutation_seconds : float, optional
        Search time of the permutation (of the whole dimension the layer shares).

    Examples
    --------
    >>> LayerReport("model.layers.0.mlp.up_proj", [1536, 576], "pruned", 0.7, 0.2, 0.05, 0.3).error
    0.05
    """

    name: str
    shape: list
    status: str
    kept_l1: float = None
    error_masked: float = None
    error: float = None
    seconds: float = None
    permutation: dict = None
    permutation_gain: float = None
    permutation_seconds: float = None


def prune(model, calibration, pattern, *, transposable=True, score="sparsegpt", method="auto", blocks=None,
          layers=None, dampening=0.01, steps=200, lr=1e-3, permute=False, permute_seconds=1.0, report=None,
          progress=False, log_block=None, offload_activations=None, block_loader=None):
    """Prune a trained model's layers to N:M with calibration data, one block at a time.

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned. Its ``nn.Linear`` layers (and subclasses), GPT-2
        style ``Conv1D`` layers (weight stored ``(in, out)``; groups still run along the
        input features) and, for ``"magnitude"`` and ``"adaprune"``, ``nn.Conv{1,2,3}d``
        layers inside its blocks are pruned. Embeddings and layers outside the blocks (e.g.
        a tied ``lm_head``) are left alone.
    calibration : iterable
        Batches of model inputs: a tensor (the first positional input), a tuple/list
        (positional inputs), or a dict / ``BatchEncoding`` (keyword inputs).
    pattern : str or tuple
        ``"2:4"``, ``"16:32"``, ...: N kept of every M along each layer's input features.
    transposable : bool, default True
        Transposable masks (M x M tiles over ``(out, in)``) instead of row-wise groups.
    score : {"sparsegpt", "wanda", "magnitude", "adaprune"}
        How weights are ranked and what is reconstructed (see the module notes).
    method : str, default "auto"
        The transposable solver, as in :func:`transposable.mask` (exact by default).
    blocks : str, sequence of nn.Module, or None
        The model's repeated blocks: a submodule name (``"model.layers"``), a
        ``ModuleList``, or None to find them (Hugging Face decoders and encoders, an
        ``nn.Sequential``'s children, else the largest list of same-type modules).
    layers : sequence of str, optional
        Glob patterns on layer names: prune only those (default: every prunable layer in
        the blocks). A pattern without wildcards must name a prunable layer that tiles.
    dampening : float, default 0.01
        SparseGPT: added to ``H``'s diagonal, as a fraction of its mean.
    steps : int, default 200
        AdaPrune: Adam steps per layer.
    lr : float, default 1e-3
        AdaPrune: Adam's learning rate.
    permute : bool, default False
        Before pruning a block, permute its MLP hidden dimension and every attention head's
        value dimension (see :func:`transposable.permute.permutable_dimensions`) so that
        the masks keep more of the score, searched on the block's calibration scores. The
        block computes the same function (checked on the first calibration batch); the
        model's weights stay permuted, so a saved model needs nothing extra to load. For
        SparseGPT, which prunes a layer's inputs in order, the groups of a permuted input
        dimension are placed heaviest first (by the Hessian's diagonal).
    permute_seconds : float, default 1.0
        Search time budget per permuted dimension (the search also stops at a local optimum).
    report : list, optional
        One :class:`LayerReport` per prunable layer is appended.
    progress : bool, default False
        Show a progress bar over blocks (stderr).
    log_block : callable, optional
        Called with one line of text per finished block.
    offload_activations : str or Path, optional
        A folder for the calibration hidden states between blocks (a temporary file, read
        and written one window at a time, removed at the end) instead of memory:
        ``windows x tokens x hidden x 4`` bytes in float32.
    block_loader : object, optional
        Holds one block in memory at a time (what :func:`transposable.pretrained.prune_pretrained`
        does for models larger than memory): ``block_loader.load(prefix, block)`` is called
        before a block's work and ``block_loader.unload(prefix, block, entries)`` once the
        block has produced the next block's inputs (``entries``: its :class:`LayerReport` s).

    Returns
    -------
    nn.Module
        ``model``, with exact zeros where its masks prune.

    Raises
    ------
    ValueError
        For a bad pattern, method or score, empty calibration data, no blocks found, no
        layer that tiles, a ``layers`` name that is missing, not prunable or does not tile,
        or a score that a layer type does not support, or ``permute`` with blocks that have
        no permutable dimension (all before any work).

    See Also
    --------
    adaprune : ``score="adaprune"`` with batch-norm recalibration, for small models.

    Notes
    -----
    Within a block all layers are pruned from one pass of statistics, as SparseGPT and
    Wanda do; the next block's inputs come from the pruned block. Per block the cost is two
    forward passes over the calibration data (statistics, then outputs), plus for SparseGPT
    ``O(in**2 * out)`` per layer and one ``H = X^T X`` per layer.

    References
    ----------
    Frantar and Alistarh, "SparseGPT", ICML 2023. Sun et al., "A Simple and Effective
    Pruning Approach for Large Language Models" (Wanda), ICLR 2024. Hubara et al.,
    NeurIPS 2021 (AdaPrune). Meng et al., "TSENOR", NeurIPS 2025.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    >>> data = [torch.randn(64, 16)]
    >>> model = prune(model, data, "2:4", score="sparsegpt")
    >>> import transposable as tp
    >>> tp.is_transposable_nm(model[0].weight, "2:4"), tp.is_transposable_nm(model[2].weight, "2:4")
    (True, True)
    """
    pattern = parse_pattern(pattern)
    method = resolve_method(method, pattern, transposable=transposable)
    check_score(score)
    check_flag("permute", permute)
    if permute:
        check_budget(permute_seconds, None)
    if offload_activations is not None:
        check_folder(offload_activations, "offload_activations")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration holds no batches; pass a list of model inputs (tensors or dicts)")
    found = find_blocks(model, blocks)
    targets = _targets(model, found, layers, pattern, transposable, score)
    chosen = [t for block in targets.values() for t in block]
    if not any(reason is None for _, _, reason in chosen):
        example = f" (e.g. {chosen[0][0]}: {chosen[0][2]})" if chosen else ""
        raise ValueError(f"no layer of the model tiles at {pattern}{' transposable' if transposable else ''}"
                         f"{example}; choose a smaller M, or other layers=")
    if permute and not any(permutable_dimensions(block, prefix) for prefix, block in found):
        raise ValueError(f"permute=True, but the blocks of {type(model).__name__} have no permutable dimension: "
                         f"permutations know the MLPs and attention heads of Llama, GPT-2, BERT, OPT and GPT-NeoX "
                         f"style blocks (transposable.permute.MLP_LAYOUTS, HEAD_LAYOUTS); prune without permute")
    was_training = model.training
    model.eval()
    bar = inputs = dense = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(found), unit="block", leave=False)
    try:
        with torch.no_grad(), _no_cache(model):
            inputs = Activations(_first_block_inputs(model, found[0][1], batches), offload_activations)
            # AdaPrune fits every layer to the dense model's outputs, so that it also corrects
            # the layers pruned before it: a second stream of activations, no second model.
            dense = inputs.copy() if score == "adaprune" else None
            for index, (prefix, block) in enumerate(found):
                start = time.perf_counter()
                if block_loader is not None:
                    block_loader.load(prefix, block)
                dense_outputs = None
                if dense is not None:
                    dense_outputs = _dense_pass(block, targets[prefix], dense)
                entries = _prune_block(prefix, block, targets[prefix], inputs, dense_outputs, pattern, transposable,
                                       method, score, dampening, steps, lr, permute_seconds if permute else None)
                if report is not None:
                    report.extend(entries)
                _advance(block, inputs)
                if block_loader is not None:
                    block_loader.unload(prefix, block, entries)
                _release_freed_memory()
                if bar is not None:
                    bar.update()
                if log_block is not None:
                    pruned = [e for e in entries if e.status == "pruned"]
                    errors = ", ".join(f"{e.name.rsplit('.', 1)[-1] or e.name} {e.error:.3g}" for e in pruned)
                    gains = [e.permutation_gain for e in pruned if e.permutation_gain is not None]
                    permuted = f"; permutations keep {100 * sum(gains) / len(gains):+.2f} % score" if gains else ""
                    log_block(f"block {index + 1}/{len(found)} ({prefix or 'model'}): {len(pruned)} layers pruned "
                              f"in {time.perf_counter() - start:.1f} s; relative output error {errors or '-'}"
                              f"{permuted}")
    finally:
        if bar is not None:
            bar.close()
        for stream in (inputs, dense):
            if stream is not None:
                stream.close()
        model.train(was_training)
    return model


def find_blocks(model, blocks=None):
    """The blocks :func:`prune` walks through, with their names.

    Parameters
    ----------
    model : nn.Module
        The model.
    blocks : str, sequence of nn.Module, or None
        As in :func:`prune`.

    Returns
    -------
    list of (str, nn.Module)
        ``(name in model.named_modules(), block)`` in order.

    Raises
    ------
    ValueError
        If ``blocks`` names nothing usable, or none are found.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> [name for name, _ in find_blocks(model)]
    ['0', '1']
    """
    names = {id(module): name for name, module in model.named_modules()}
    if isinstance(blocks, str):
        try:
            blocks = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"blocks={blocks!r} names no submodule of {type(model).__name__}") from None
    if blocks is None:
        blocks = _default_blocks(model)
    found = [(names.get(id(block)), block) for block in blocks]
    if not found or any(name is None for name, _ in found):
        raise ValueError(f"blocks must be modules of the model (a ModuleList such as model.layers), got {blocks!r}")
    return found


def _default_blocks(model):
    for path in BLOCK_PATHS:
        try:
            candidate = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(candidate, (nn.ModuleList, nn.Sequential)) and len(candidate):
            return candidate
    if isinstance(model, nn.Sequential):
        return model
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
             and len({type(child) for child in m}) == 1]
    if lists:
        return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    raise ValueError(f"found no blocks in {type(model).__name__}: pass blocks= a ModuleList of the model "
                     f"(or its name, e.g. blocks='model.layers')")


def prunable(module):
    """Whether :func:`prune` (and ``sparsify``) can prune this layer type.

    ``nn.Linear`` and its subclasses, Hugging Face / GPT-2 ``Conv1D`` (recognised without
    importing transformers) and ``nn.Conv{1,2,3}d``.

    Parameters
    ----------
    module : nn.Module
        Any module.

    Returns
    -------
    bool
        True for the layer types above.

    Examples
    --------
    >>> import torch
    >>> prunable(torch.nn.Linear(4, 4)), prunable(torch.nn.LayerNorm(4))
    (True, False)
    """
    return isinstance(module, (nn.Linear, *CONVOLUTIONS)) or is_conv1d(module)


def is_conv1d(module):
    """Whether ``module`` is a GPT-2 style ``Conv1D``: a linear layer stored ``(in, out)``.

    Recognised by its class name and attribute, without importing transformers.

    Parameters
    ----------
    module : nn.Module
        Any module.

    Returns
    -------
    bool
        True for ``transformers.pytorch_utils.Conv1D`` and look-alikes.

    Examples
    --------
    >>> import torch
    >>> is_conv1d(torch.nn.Linear(4, 4))
    False
    """
    return (any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) and hasattr(module, "nf")
            and getattr(module, "weight", None) is not None)


def linear_weight(module):
    """A layer's weight as ``(out, in[, *kernel])``: the transpose for ``Conv1D``.

    Parameters
    ----------
    module : nn.Module
        A :func:`prunable` layer.

    Returns
    -------
    Tensor
        A view of the weight (not a copy).

    Examples
    --------
    >>> import torch
    >>> tuple(linear_weight(torch.nn.Linear(4, 8)).shape)
    (8, 4)
    """
    return module.weight.t() if is_conv1d(module) else module.weight


def _targets(model, found, layers, pattern, transposable, score):
    """Per block prefix, the ``(name, layer, reason left dense or None)`` to prune."""
    modules = dict(model.named_modules())
    explicit = [glob for glob in (layers or ()) if not any(ch in glob for ch in "*?[")]
    for name in explicit:
        module = modules.get(name)
        if not (module is not None and prunable(module)):
            raise ValueError(f"layer {name!r} is {'missing' if module is None else type(module).__name__}; "
                             f"prunable layers are Linear, Conv1D and Conv1d/2d/3d")
        error = tiling_error(tuple(linear_weight(module).shape), pattern.m, transposable=transposable, hint="")
        if error is not None:
            raise ValueError(f"layer {name!r} has weight shape {tuple(module.weight.shape)}, which does not tile at "
                             f"{pattern} ({error.reason}); leave it out of layers=")
    targets = {}
    for prefix, block in found:
        chosen = []
        for sub, module in block.named_modules():
            name = f"{prefix}.{sub}" if sub else prefix
            if not prunable(module) or (layers is not None and not any(fnmatch.fnmatchcase(name, g) for g in layers)):
                continue
            if isinstance(module, CONVOLUTIONS) and score in ("wanda", "sparsegpt"):
                raise ValueError(f"layer {name!r} is a {type(module).__name__}: score {score!r} is defined for "
                                 f"linear layers; use score='magnitude' or 'adaprune', or leave it out with layers=")
            error = tiling_error(tuple(linear_weight(module).shape), pattern.m, transposable=transposable, hint="")
            chosen.append((name, module, None if error is None else error.reason))
        targets[prefix] = chosen
    return targets


class _Captured(Exception):
    """Raised by the hook on the first block once its inputs are recorded."""


def _call(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _first_block_inputs(model, block, batches):
    """``(args, kwargs)`` the first block receives for every calibration batch; the rest of
    the model does not run."""
    captured = []

    def record(module, args, kwargs):
        captured.append((args, dict(kwargs)))
        raise _Captured

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _call(model, batch)
            except _Captured:
                continue
            raise ValueError("the model's forward never reached its first block; check blocks=")
    finally:
        handle.remove()
    # Every batch of one shape gets the same rotary tables, causal mask and position ids:
    # keep one copy of each, not one per batch (for SmolLM2 at 128 windows of 512 tokens they
    # would hold more memory than the hidden states).
    pool = []
    return [(args, {key: value if key == "hidden_states" else _one_copy(value, pool) for key, value in kwargs.items()})
            for args, kwargs in captured]


def _one_copy(value, pool):
    """``value`` with every tensor replaced by an equal one already in ``pool`` (else added)."""
    if isinstance(value, torch.Tensor):
        for kept in pool:
            if kept.shape == value.shape and kept.dtype == value.dtype and kept.device == value.device \
                    and torch.equal(kept, value):
                return kept
        pool.append(value)
        return value
    if isinstance(value, (tuple, list)):
        items = [_one_copy(item, pool) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
    return value


class Activations:
    """The calibration windows' inputs to the current block, ``(args, kwargs)`` per window.

    Indexing gives a window's inputs and assigning replaces its hidden state (the first
    positional input, else ``hidden_states``); everything else a block receives (rotary
    tables, masks) is shared and stays as captured. The hidden states are kept where they
    were captured, or with ``directory`` in a temporary file there, read and written one
    window at a time with plain reads (a memory map would count the touched pages as the
    process's memory) and handed out on the device they came from.

    Parameters
    ----------
    captured : list of (tuple, dict)
        Every window's inputs, as :func:`_first_block_inputs` records them.
    directory : str or Path, optional
        Where the file goes; it is removed by :meth:`close`.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        If ``directory`` is missing or not a folder.

    Examples
    --------
    >>> import torch
    >>> stream = Activations([((torch.zeros(2, 3),), {"mask": None})], directory=__import__("tempfile").gettempdir())
    >>> stream[0] = ((torch.ones(2, 3),), {"mask": None})
    >>> stream[0][0][0].sum().item(), stream[0][1]
    (6.0, {'mask': None})
    >>> stream.close()
    """

    def __init__(self, captured, directory=None):
        self.calls = [(args[1:], kwargs if args else {k: v for k, v in kwargs.items() if k != "hidden_states"})
                      for args, kwargs in captured]
        self.positional = [bool(args) for args, _ in captured]
        hidden = [args[0] if args else kwargs["hidden_states"] for args, kwargs in captured]
        self.directory, self.file = directory, None
        if directory is None:
            self.hidden = hidden
            return
        self.file = tempfile.TemporaryFile(dir=directory, prefix="transposable-activations-")
        self.layouts = [(h.shape, h.dtype, h.device) for h in hidden]
        self.offsets = np.concatenate([[0], np.cumsum([h.numel() * h.element_size() for h in hidden])]).tolist()
        for j, h in enumerate(hidden):
            self._write(j, h)

    def __len__(self):
        return len(self.calls)

    def __getitem__(self, j):
        args, kwargs = self.calls[j]
        hidden = self.hidden[j] if self.file is None else self._read(j)
        return ((hidden, *args), kwargs) if self.positional[j] else (args, {**kwargs, "hidden_states": hidden})

    def __setitem__(self, j, value):
        args, kwargs = value
        hidden = args[0] if self.positional[j] else kwargs["hidden_states"]
        if self.file is None:
            self.hidden[j] = hidden
        else:
            self._write(j, hidden)

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def copy(self):
        """An independent stream with the same contents (in a new file if this one has one)."""
        twin = Activations([], None)
        twin.__dict__.update(self.__dict__)
        if self.file is None:
            twin.hidden = list(self.hidden)  # assignment replaces a window's tensor, never changes it
            return twin
        twin.file = tempfile.TemporaryFile(dir=self.directory, prefix="transposable-activations-")
        chunk = 1 << 24
        for offset in range(0, self.offsets[-1], chunk):
            twin._put(os.pread(self.file.fileno(), chunk, offset), offset)
        return twin

    def close(self):
        """Remove the file, if any."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def _write(self, j, hidden):
        self._put(hidden.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy(), self.offsets[j])

    def _put(self, data, offset):
        if os.pwrite(self.file.fileno(), data, offset) != len(data):
            raise OSError(f"could not write the activations to '{self.directory}' (disk full?)")

    def _read(self, j):
        shape, dtype, device = self.layouts[j]
        data = bytearray(os.pread(self.file.fileno(), self.offsets[j + 1] - self.offsets[j], self.offsets[j]))
        return torch.frombuffer(data, dtype=dtype).view(shape).to(device)


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(args, kwargs, hidden):
    """The block inputs with the hidden state (first positional, else ``hidden_states``) replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _no_cache:
    """Hugging Face models: no key/value cache while pruning (restored afterwards)."""

    def __init__(self, model):
        self.config = getattr(model, "config", None)

    def __enter__(self):
        self.saved = getattr(self.config, "use_cache", None)
        if self.saved is not None:
            self.config.use_cache = False

    def __exit__(self, *exc):
        if self.saved is not None:
            self.config.use_cache = self.saved


class _InputStats:
    """What one layer's inputs tell each score, accumulated batch by batch."""

    def __init__(self, layer, score):
        self.layer, self.score = layer, score
        self.sample = None  # the first batch's inputs: the reported errors are measured on them
        self.inputs = []  # AdaPrune fits on all of them
        self.tokens = 0
        self.sum_squares = None  # Wanda
        self.hessian = None  # SparseGPT
        self.moves = []  # permutations of the input features applied so far (permute=True)

    def permute_inputs(self, positions):
        """Reorder every statistic along the input features (``positions[i]``: the old
        feature now at ``i``), remembering it for :meth:`restore_inputs`."""
        self.moves.append(positions)
        self._reorder(positions)

    def restore_inputs(self):
        for positions in reversed(self.moves):
            self._reorder(torch.argsort(positions))
        self.moves = []

    def _reorder(self, positions):
        positions = positions.to(self.sample.device)  # statistics live beside the inputs
        self.sample = self.sample.index_select(-1, positions)
        self.inputs = [x.index_select(-1, positions) for x in self.inputs]
        if self.sum_squares is not None:
            self.sum_squares = self.sum_squares.index_select(0, positions)
        if self.hessian is not None:
            self.hessian = self.hessian.index_select(0, positions).index_select(1, positions)

    def add(self, x):
        x = x.detach()
        if self.sample is None:
            self.sample = x
        if self.score == "adaprune":
            self.inputs.append(x)
        if self.score not in ("wanda", "sparsegpt"):
            return
        flat = x.reshape(-1, x.shape[-1]).float()
        self.tokens += flat.shape[0]
        # Accumulated in place: a new sum per batch, kept while the block's temporaries come
        # and go, would fragment the heap (measured: +30 % peak memory on SmolLM2).
        if self.score == "wanda":
            squares = flat.pow(2).sum(dim=0).double()
            if self.sum_squares is None:
                self.sum_squares = squares
            else:
                self.sum_squares += squares
        else:
            product = (flat.t() @ flat).double()
            if self.hessian is None:
                self.hessian = product
            else:
                self.hessian += product


def _advance(block, inputs):
    """Replace every window's inputs by the block's outputs: the next block's inputs."""
    for j in range(len(inputs)):
        args, kwargs = inputs[j]
        inputs[j] = _with_hidden(args, kwargs, _hidden(block(*args, **kwargs)))


def _dense_pass(block, targets, inputs):
    """Run the still dense block: every target layer's outputs; ``inputs`` become the next
    dense inputs."""
    outputs = {name: [] for name, _, reason in targets if reason is None}
    handles = [layer.register_forward_hook(lambda module, args, out, kept=outputs[name]: kept.append(out.detach()))
               for name, layer, reason in targets if reason is None]
    try:
        _advance(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _release_freed_memory():
    """Hand the memory freed so far back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). The C heap keeps freed blocks for reuse, and a block's passes over the
    calibration data leave it fragmented: trimmed between passes, the peak of a streamed
    SmolLM2 prune falls by a fifth (benchmarks/README.md, issue 19)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None; looked up once (``find_library`` runs ``ldconfig``)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _prune_block(prefix, block, targets, inputs, dense_outputs, pattern, transposable, method, score, dampening,
                 steps, lr, permute_seconds):
    entries = [LayerReport(name, list(layer.weight.shape), f"left dense: {reason}")
               for name, layer, reason in targets if reason is not None]
    live = [(name, layer) for name, layer, reason in targets if reason is None]
    stats = {name: _InputStats(layer, score) for name, layer in live}
    handles = [layer.register_forward_pre_hook(lambda module, args, kept=stats[name]: kept.add(args[0]))
               for name, layer in live]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    _release_freed_memory()
    permutations = {}
    if permute_seconds is not None:
        permutations = _permute_block(prefix, block, inputs[0], stats, dense_outputs, pattern, transposable, score,
                                      dampening, permute_seconds)
        for entry in entries:
            if entry.name in permutations:
                entry.permutation = permutations[entry.name][2]
    for name, layer in live:
        targets_out = dense_outputs[name] if dense_outputs is not None else None
        entry = _prune_layer(name, layer, stats[name], targets_out, pattern, transposable, method, score, dampening,
                             steps, lr)
        if name in permutations:
            entry.permutation_gain, entry.permutation_seconds, entry.permutation = permutations[name]
        entries.append(entry)
        _release_freed_memory()
    return entries


def _permute_block(prefix, block, sample, stats, dense_outputs, pattern, transposable, score, dampening, seconds):
    """Permute the block's permutable dimensions on the calibration scores of its layers,
    and move the statistics of the layers' inputs (and AdaPrune's dense outputs) along.

    For SparseGPT the groups are placed by decreasing second moment of the inputs of the
    layers that read the dimension (the Hessian's diagonal, as GPTQ's "act order"): SparseGPT
    prunes a layer's inputs in order and spreads each error over those still to come, so the
    order matters as much as the grouping (benchmarks/README.md, issue 17).

    The block's outputs on ``sample`` are compared before and after: a block whose layers
    are named like a known layout but compute something else is put back as it was, with a
    warning. Returns ``{layer name: (gain or None, search seconds, {"axis", "positions"})}``
    for every permuted layer."""
    args, kwargs = sample
    before = _hidden(block(*args, **kwargs)).double()
    scores = {name: _importance(kept.layer, kept, score, dampening) for name, kept in stats.items()}
    done, permuted = [], {}
    for dimension in permutable_dimensions(block, prefix):
        priority = None
        if score == "sparsegpt":  # SparseGPT walks a reader's inputs in order: heaviest groups first
            priority = np.zeros(dimension.size)
            for name, _, axis, index in dimension.members:
                if axis == 1 and name in stats:
                    diagonal = torch.diag(stats[name].hessian).cpu().numpy()
                    inside = index >= 0
                    np.add.at(priority, index[inside], diagonal[inside] / max(diagonal.mean(), 1e-300))
        report = permute_dimension(dimension, {name: scores[name] for name, *_ in dimension.members if name in scores},
                                   pattern, transposable=transposable, seconds=seconds, priority=priority)
        done.append((dimension, report.order))
        for name, _, axis, index in dimension.members:
            positions = torch.as_tensor(dimension.positions(report.order, index))
            permuted[name] = (report.layers.get(name), report.seconds, {"axis": axis, "positions": positions.tolist()})
            if axis == 1 and name in stats:
                stats[name].permute_inputs(positions)
            if axis == 0 and dense_outputs is not None and name in dense_outputs:
                dense_outputs[name] = [y.index_select(-1, positions.to(y.device)) for y in dense_outputs[name]]
    after = _hidden(block(*args, **kwargs)).double()
    change = float((after - before).norm() / before.norm().clamp_min(1e-300))
    if change > (1e-4 if before.dtype == torch.float32 or _dtype(block) == torch.float32 else 1e-2):
        for dimension, order in reversed(done):
            apply_permutation(dimension, np.argsort(order))
        log.warning("block %s: the channel permutations changed its outputs (relative %.2g): its layers are named "
                    "like a known layout but compute something else; it is pruned unpermuted", prefix or "model",
                    change)
        for name, kept in stats.items():
            kept.restore_inputs()
        return {}
    return permuted


def _dtype(module):
    return next((p.dtype for p in module.parameters()), torch.float32)


def _importance(layer, stats, score, dampening):
    """The layer's weight importance as its score defines it, ``(out, in)``, float64: for
    SparseGPT the saliency before any update, ``w**2 / [H^-1]_jj``."""
    weight = linear_weight(layer).detach().double()
    if score == "wanda":
        return weight.abs() * (stats.sum_squares / max(stats.tokens, 1)).sqrt().to(weight)[None, :]
    if score == "sparsegpt":
        h, _ = _dampened(stats.hessian / max(stats.tokens, 1), dampening)
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return weight.pow(2) / torch.diag(inverse).to(weight)[None, :]
    return weight.abs()


def _prune_layer(name, layer, stats, dense_outputs, pattern, transposable, method, score, dampening, steps, lr):
    start = time.perf_counter()
    # (out, in[, *kernel]), float32: for a float32 layer its own values, which stay as they
    # are until the layer is written at the end (no copy: a 7B layer's copy is 180 MB).
    weight = linear_weight(layer).detach().float()
    new = None
    if score == "sparsegpt":
        hessian, stats.hessian = stats.hessian.div_(max(stats.tokens, 1)), None  # one copy fewer alive
        new, keep = sparsegpt(weight, hessian, pattern, transposable=transposable, method=method,
                              dampening=dampening)
        del hessian
    else:
        scores = None
        if score == "wanda":
            scores = weight.abs() * (stats.sum_squares / max(stats.tokens, 1)).sqrt().to(weight)[None, :]
        keep = mask(weight, pattern, transposable=transposable, method=method, scores=scores)
        del scores
    original = _stored(layer, weight)
    bias = None if layer.bias is None else layer.bias.detach().float().clone()
    masked = _stored(layer, weight * keep)
    new_weight, new_bias = masked if new is None else _stored(layer, new), bias
    if score == "adaprune":
        new_weight, new_bias = _fit(layer, _stored(layer, keep.to(weight.dtype)), masked, bias, stats.inputs,
                                    dense_outputs, steps, lr)
    error_masked = _relative_error(layer, (masked, bias), (original, bias), stats.sample)
    error = _relative_error(layer, (new_weight, new_bias), (original, bias), stats.sample)
    kept = kept_fraction(weight, keep)  # before the layer (maybe weight itself) is written
    with torch.no_grad():
        layer.weight.copy_(new_weight.to(layer.weight.dtype))
        if new_bias is not None:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))
    return LayerReport(name, list(layer.weight.shape), "pruned", kept, error_masked, error,
                       time.perf_counter() - start)


def _stored(layer, weight):
    """A weight in the library's ``(out, in)`` convention, as the layer stores it."""
    return weight.t() if is_conv1d(layer) else weight


def _outputs(layer, weight, bias, x):
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return functional_call(layer, params, (x.float(),))


def _relative_error(layer, candidate, reference, x):
    """``||f(x; candidate) - f(x; reference)||^2 / ||f(x; reference)||^2``."""
    ours, theirs = _outputs(layer, *candidate, x).double(), _outputs(layer, *reference, x).double()
    return float((ours - theirs).pow(2).sum() / theirs.pow(2).sum().clamp_min(1e-300))


def _fit(layer, keep, masked, bias, inputs, targets, steps, lr):
    """AdaPrune: fit the kept weights and the bias with Adam so that the layer's outputs on
    ``inputs`` match ``targets`` (the dense model's); returns ``(weight, bias)``."""
    weight = masked.clone().requires_grad_(True)
    trainable = [weight]
    fitted_bias = None
    if bias is not None:
        fitted_bias = bias.clone().requires_grad_(True)
        trainable.append(fitted_bias)
    optimizer = torch.optim.Adam(trainable, lr=lr)
    targets = [y.float() for y in targets]
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum((_outputs(layer, weight * keep, fitted_bias, x) - y).pow(2).mean()
                       for x, y in zip(inputs, targets)) / len(inputs)
            loss.backward()
            optimizer.step()
    return (weight * keep).detach(), None if fitted_bias is None else fitted_bias.detach()


def _dampened(hessian, dampening):
    """``(H + dampening * mean(diag H) * I, dead)``, a new tensor, with every input that is
    always zero (``dead``) given a unit diagonal: nothing to reconstruct from."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += dampening * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, dead


def sparsegpt(weight, hessian, pattern, *, transposable=True, method="auto", dampening=0.01, blocksize=128):
    """SparseGPT: an N:M mask and the reconstructed weights of one linear layer.

    Columns are processed in order. Every M columns the mask of that slab is chosen on the
    weights as already updated, by the saliency ``w**2 / [H^-1]_jj**2`` (for transposable
    masks: the exact transposable mask of the slab's M x M tiles); each pruned weight's
    error is then spread over the columns still to come along the Cholesky factor of
    ``H^-1`` (optimal brain surgeon, with lazy block updates).

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        The layer's weight (any float dtype; computed in float32).
    hessian : Tensor, shape (in, in)
        ``X^T X / tokens`` of the layer's calibration inputs.
    pattern : str, tuple or Pattern
        The N:M pattern.
    transposable : bool, default True
        Transposable masks (``out`` must be a multiple of M) instead of row-wise ones.
    method : str, default "auto"
        The transposable solver.
    dampening : float, default 0.01
        Added to the diagonal of ``H`` as a fraction of its mean (numerical stability).
    blocksize : int, default 128
        Columns per lazy update (rounded down to a multiple of M).

    Returns
    -------
    weight : Tensor, shape (out, in)
        Reconstructed, float32, zero where pruned.
    mask : Tensor of bool, shape (out, in)
        The mask (N:M along ``in``; transposable if asked).

    References
    ----------
    Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML 2023.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 16)
    >>> w = torch.randn(8, 16)
    >>> new, keep = sparsegpt(w, x.t() @ x / 256, "2:4")
    >>> error = lambda v: float((x @ (v - w).t()).pow(2).sum())
    >>> bool(error(new) < error(w * keep)), int(keep.sum())
    (True, 64)
    """
    pattern = parse_pattern(pattern)
    m = pattern.m
    w = weight.detach().clone().float()
    h, dead = _dampened(hessian.detach().to(torch.float64 if w.device.type == "cpu" else torch.float32), dampening)
    columns = w.shape[1]
    w[:, dead] = 0
    h = torch.cholesky_inverse(torch.linalg.cholesky(h))
    h_inv = torch.linalg.cholesky(h, upper=True).to(w.dtype)
    del h  # n x n float64: the largest thing a layer holds
    keep = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    step = max(m, blocksize // m * m)
    for first in range(0, columns, step):
        last = min(first + step, columns)
        block, block_inv = w[:, first:last].clone(), h_inv[first:last, first:last]
        errors = torch.zeros_like(block)
        for i in range(last - first):
            if i % m == 0:
                slab = block[:, i:i + m]
                saliency = slab.pow(2) / torch.diag(block_inv)[i:i + m].pow(2)
                keep[:, first + i:first + i + m] = mask(slab, pattern, transposable=transposable, method=method,
                                                        scores=saliency)
            column = block[:, i]
            kept = column * keep[:, first + i]
            error = (column - kept) / block_inv[i, i]
            # In place (rank-1 and matrix updates without temporaries): per-column
            # temporaries of out x blocksize fragment the heap (measured: +25 % peak).
            block[:, i:].addr_(error, block_inv[i, i:], alpha=-1)
            block[:, i] = kept
            errors[:, i] = error
        w[:, first:last] = block
        w[:, last:].addmm_(errors, h_inv[first:last, last:], alpha=-1)
    return w * keep, keep
