"""Calibrated one-shot pruning to N:M or transposable N:M, one block at a time.

The layer-wise recipe of SparseGPT and Wanda, with the library's exact masks: capture the
inputs of the model's first block on a little calibration data, then for each block in
turn collect statistics of every prunable layer's inputs, choose each layer's mask from
importance scores, reconstruct what is kept, and run the pruned block to produce the next
block's inputs. Only one block's activations are held at a time, and the model is never
copied, so memory is the model plus one block's worth of calibration activations.

What a run does is a :class:`PruneRecipe` (pattern, score and its options, solver, layers,
channel permutations), checked once and recorded in reports; :func:`prune` builds one from
its keywords. The scores (``score=``) are modules of :mod:`transposable.scores`, each
declaring the statistics it needs; the block walker here knows none by name:

- ``"sparsegpt"``: the optimal-brain-surgeon saliency ``W_ij**2 / [H^-1]_jj**2`` with
  ``H = X^T X`` (Frantar and Alistarh, 2023), masks chosen M columns at a time on the
  weights as already updated, every pruned weight's error spread over the columns not yet
  processed (dampened Cholesky of ``H``); for transposable masks, the exact mask of each
  slab of M x M tiles (as TSENOR; Meng et al., 2025).
- ``"wanda"``: ``|W_ij| * ||X_j||_2`` (Sun et al., 2024): weights times the norm of their
  input feature over the calibration tokens; no reconstruction.
- ``"magnitude"``: ``|W|``.
- ``"adaprune"``: magnitude masks, then the kept weights and bias fitted with Adam so the
  layer's outputs match the dense layer's on the same inputs (Hubara et al., 2021).
- ``"alps"``: layer-wise reconstruction by ADMM (Meng et al., 2024), each iteration's
  projection the exact (transposable) mask, then conjugate gradients on the final support.
"""
import copy
import fnmatch
import functools
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from .io import check_folder
from .layers import as_stored, is_conv1d, layer_outputs, linear_weight, prunable  # noqa: F401  (public here too)
from .layers import CONVOLUTIONS
from .layout import tiling_error
from .masks import check_flag, kept_fraction, resolve_method
from .patterns import parse_pattern
from .permutation import check_budget
from .permute import apply_permutation, permutable_dimensions, permute_dimension
from .scores import SCORES
from .scores.base import LayerStatistics, Option
from .scores.sparsegpt import sparsegpt  # noqa: F401  (public here too)

log = logging.getLogger("transposable")

#: ``refit_dampening``: the refit's pull back to the dense weight (its default, and the check).
REFIT_DAMPENING = Option(1.0, "the refit's pull to the dense weight", "positive")


def check_score(score):
    """Raise ``ValueError`` unless ``score`` names a score of :data:`~transposable.scores.SCORES`.

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
    ValueError: unknown score 'obs'; choose from ['sparsegpt', 'wanda', 'magnitude', 'adaprune', 'alps']
    """
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose from {list(SCORES)}")


@dataclass(frozen=True)
class PruneRecipe:
    """What a prune does, checked and resolved once: the steps and their options.

    Built by :func:`prune` and :func:`transposable.pretrained.prune_pretrained` from their
    keywords and by the ``prune`` command from its options, and recorded in the report
    (:meth:`as_dict`) so that a run can be repeated.

    Parameters
    ----------
    pattern : str, tuple or Pattern
        ``"2:4"``, ``"16:32"``, ...: N kept of every M along each layer's input features
        (parsed: the attribute is a :class:`~transposable.patterns.Pattern`).
    transposable : bool, default True
        Transposable masks (M x M tiles over ``(out, in)``) instead of row-wise groups.
    score : str, default "sparsegpt"
        A name of :data:`transposable.scores.SCORES`: how weights are ranked and what is
        reconstructed.
    method : str, default "auto"
        The mask solver, as in :func:`transposable.mask` (resolved: ``"auto"`` becomes the
        engine's name).
    layers : sequence of str, optional
        Glob patterns on layer names: prune only those (default: every prunable layer in
        the blocks).
    options : mapping, optional
        The score's own options (its ``OPTIONS``, e.g. SparseGPT's ``dampening``,
        AdaPrune's ``steps`` and ``lr``); the others take their defaults.
    permute : bool, default False
        Permute each block's permutable dimensions before pruning it (see :func:`prune`).
    permute_seconds : float, default 1.0
        Search time budget per permuted dimension.
    refit : bool, default False
        Prune each block's layers group by group, each refitted to the dense model's
        outputs first (see :func:`prune`).
    refit_dampening : float, default 1.0
        How far the refit is pulled back to the dense weight: ``lambda`` of
        :func:`refit_weight`, as a fraction of the mean of ``diag(X^T X)`` (positive).

    Raises
    ------
    TypeError, ValueError
        Naming the first bad field and its value: the pattern, a flag that is not a bool,
        an unknown score or method, a method that cannot solve the pattern, ``layers`` that
        is not a list of strings, an option the score does not take or a bad value of one,
        a budget that is not positive.

    Examples
    --------
    >>> recipe = PruneRecipe("2:4", score="sparsegpt", options={"dampening": 0.05})
    >>> recipe.pattern, recipe.method, dict(recipe.options)
    (Pattern(n=2, m=4), 'exhaustive', {'dampening': 0.05})
    >>> PruneRecipe("2:4", score="wanda", options={"dampening": 0.05})
    Traceback (most recent call last):
    ...
    ValueError: score 'wanda' takes no option 'dampening' (its options: none)
    """

    pattern: object
    transposable: bool = True
    score: str = "sparsegpt"
    method: str = "auto"
    layers: tuple = None
    options: Mapping = field(default_factory=dict)
    permute: bool = False
    permute_seconds: float = 1.0
    refit: bool = False
    refit_dampening: float = REFIT_DAMPENING.default

    def __post_init__(self):
        pattern = parse_pattern(self.pattern)
        check_flag("transposable", self.transposable)
        check_score(self.score)
        method = resolve_method(self.method, pattern, transposable=self.transposable)
        layers = self.layers
        if layers is not None:
            if isinstance(layers, str) or not all(isinstance(glob, str) for glob in layers):
                raise TypeError(f"layers must be a list of layer names or glob patterns, got {layers!r}")
            layers = tuple(layers)
        declared = SCORES[self.score].OPTIONS
        for name in self.options:
            if name not in declared:
                raise ValueError(f"score {self.score!r} takes no option {name!r} (its options: "
                                 f"{', '.join(declared) or 'none'})")
        options = {name: option.check(name, self.options.get(name, option.default))
                   for name, option in declared.items()}
        check_flag("permute", self.permute)
        check_flag("refit", self.refit)
        REFIT_DAMPENING.check("refit_dampening", self.refit_dampening)
        check_budget(self.permute_seconds, None)
        for name, value in (("pattern", pattern), ("method", method), ("layers", layers),
                            ("options", MappingProxyType(options))):
            object.__setattr__(self, name, value)

    @property
    def step(self):
        """The score's module (:data:`transposable.scores.SCORES`)."""
        return SCORES[self.score]

    def as_dict(self):
        """The recipe as plain JSON values (what the reports record).

        Returns
        -------
        dict
            Every field; the pattern as ``"N:M"``.
        """
        return {"pattern": str(self.pattern), "transposable": self.transposable, "score": self.score,
                "method": self.method, "layers": None if self.layers is None else list(self.layers),
                "options": dict(self.options), "permute": self.permute, "permute_seconds": self.permute_seconds,
                "refit": self.refit, "refit_dampening": self.refit_dampening}


#: Where Hugging Face models keep their repeated blocks, tried in this order.
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks",
               "model.language_model.layers", "encoder.layer", "bert.encoder.layer", "roberta.encoder.layer",
               "layers")


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
          layers=None, dampening=0.01, steps=200, lr=1e-3, permute=False, permute_seconds=1.0, refit=False,
          refit_dampening=REFIT_DAMPENING.default, report=None, progress=False, log_block=None,
          offload_activations=None, block_loader=None, options=None):
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
    score : {"sparsegpt", "wanda", "magnitude", "adaprune", "alps"}
        How weights are ranked and what is reconstructed (see the module notes; any name
        of :data:`transposable.scores.SCORES`).
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
    refit : bool, default False
        Prune a block's layers one group after another (a group: the layers that read one
        input, as q, k and v), each on the inputs the already pruned layers give it, and
        before its score runs replace each linear layer's weight by the least-squares fit
        of the dense model's outputs on those inputs (:func:`refit_weight`). For scores
        that reconstruct (SparseGPT, ALPS) the errors of earlier layers are then corrected
        instead of copied. It costs one more forward pass per group and the dense model's
        outputs beside the pruned ones; convolutions are not refitted. The reported errors
        are measured against the dense model's outputs.
    refit_dampening : float, default 1.0
        The refit's pull back to the dense weight, as a fraction of the mean of the
        inputs' ``diag(X^T X)``: a small one fits the calibration text closely, a larger
        one keeps more of what the dense weight does on other text.
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
    options : mapping, optional
        The score's options by name (its ``OPTIONS``: ALPS's ``rho``, ``iterations`` and
        ``pcg_steps``, ...), over ``dampening``, ``steps`` and ``lr``.

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
    Wanda do (``refit=True``: group by group, from a pass per group); the next block's
    inputs come from the pruned block. Per block the cost is two
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
    check_score(score)
    named = {"dampening": dampening, "steps": steps, "lr": lr}  # each score takes its own
    named = {name: value for name, value in named.items() if name in SCORES[score].OPTIONS}
    recipe = PruneRecipe(pattern, transposable=transposable, score=score, method=method, layers=layers,
                         options={**named, **(options or {})}, permute=permute, permute_seconds=permute_seconds,
                         refit=refit, refit_dampening=refit_dampening)
    return prune_model(model, calibration, recipe, blocks=blocks, report=report, progress=progress,
                       log_block=log_block, offload_activations=offload_activations, block_loader=block_loader)


def prune_model(model, calibration, recipe, *, blocks=None, report=None, progress=False, log_block=None,
                offload_activations=None, block_loader=None):
    """Prune a trained model as ``recipe`` says, one block at a time (what :func:`prune` runs).

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned (see :func:`prune`).
    calibration : iterable
        Batches of model inputs (see :func:`prune`).
    recipe : PruneRecipe
        The pattern, score, solver, layers and permutations.
    blocks : str, sequence of nn.Module, or None
        The model's repeated blocks (see :func:`prune`).
    report : list, optional
        One :class:`LayerReport` per prunable layer is appended.
    progress : bool, default False
        Show a progress bar over blocks (stderr).
    log_block : callable, optional
        Called with one line of text per finished block.
    offload_activations : str or Path, optional
        A folder for the calibration hidden states between blocks (see :func:`prune`).
    block_loader : object, optional
        Holds one block in memory at a time (see :func:`prune`).

    Returns
    -------
    nn.Module
        ``model``, with exact zeros where its masks prune.

    Raises
    ------
    TypeError
        If ``recipe`` is not a :class:`PruneRecipe`.
    ValueError
        As :func:`prune`, before any work.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    >>> model = prune_model(model, [torch.randn(64, 16)], PruneRecipe("4:8", score="wanda", transposable=False))
    >>> int((model[0].weight != 0).sum()), int((model[2].weight != 0).sum())
    (256, 256)
    """
    if not isinstance(recipe, PruneRecipe):
        raise TypeError(f"recipe must be a PruneRecipe, got {type(recipe).__name__}")
    pattern, transposable, step = recipe.pattern, recipe.transposable, recipe.step
    if offload_activations is not None:
        check_folder(offload_activations, "offload_activations")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration holds no batches; pass a list of model inputs (tensors or dicts)")
    found = find_blocks(model, blocks)
    targets = _targets(model, found, recipe)
    chosen = [t for block in targets.values() for t in block]
    if not any(reason is None for _, _, reason in chosen):
        example = f" (e.g. {chosen[0][0]}: {chosen[0][2]})" if chosen else ""
        raise ValueError(f"no layer of the model tiles at {pattern}{' transposable' if transposable else ''}"
                         f"{example}; choose a smaller M, or other layers=")
    if recipe.permute and not any(permutable_dimensions(block, prefix) for prefix, block in found):
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
            # AdaPrune and the refit fit every layer to the dense model's outputs, so that they
            # also correct the layers pruned before it: a second stream of activations, the
            # dense model's inputs of each block, and no second model (a copy of one block).
            dense = inputs.copy() if "dense_outputs" in step.NEEDS or recipe.refit else None
            for index, (prefix, block) in enumerate(found):
                start = time.perf_counter()
                if block_loader is not None:
                    block_loader.load(prefix, block)
                entries = _prune_block(prefix, block, targets[prefix], inputs, dense, recipe)
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


def _targets(model, found, recipe):
    """Per block prefix, the ``(name, layer, reason left dense or None)`` to prune."""
    pattern, transposable, layers = recipe.pattern, recipe.transposable, recipe.layers
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
    any_layer = " or ".join(repr(name) for name, step in SCORES.items() if not step.LINEAR_ONLY)
    targets = {}
    for prefix, block in found:
        chosen = []
        for sub, module in block.named_modules():
            name = f"{prefix}.{sub}" if sub else prefix
            if not prunable(module) or (layers is not None and not any(fnmatch.fnmatchcase(name, g) for g in layers)):
                continue
            if isinstance(module, CONVOLUTIONS) and recipe.step.LINEAR_ONLY:
                raise ValueError(f"layer {name!r} is a {type(module).__name__}: score {recipe.score!r} is defined for "
                                 f"linear layers; use score={any_layer}, or leave it out with layers=")
            error = tiling_error(tuple(linear_weight(module).shape), pattern.m, transposable=transposable, hint="")
            chosen.append((name, module, None if error is None else error.reason))
        targets[prefix] = chosen
    return targets


class _Captured(Exception):
    """Raised by the hook on the first block once its inputs are recorded."""


def call_model(model, batch):
    """Run ``model`` on one calibration batch, whatever its form.

    Parameters
    ----------
    model : nn.Module
        The model.
    batch : Tensor, tuple, list or mapping
        The first positional input, the positional inputs, or the keyword inputs
        (a dict or ``BatchEncoding``).

    Returns
    -------
    object
        What the model returns.

    Examples
    --------
    >>> import torch
    >>> call_model(torch.nn.Identity(), {"input": torch.ones(1)}).tolist()
    [1.0]
    """
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
                call_model(model, batch)
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


def _advance(block, inputs):
    """Replace every window's inputs by the block's outputs: the next block's inputs."""
    for j in range(len(inputs)):
        args, kwargs = inputs[j]
        inputs[j] = _with_hidden(args, kwargs, _hidden(block(*args, **kwargs)))


def _dense_outputs(dense, inputs, advance):
    """AdaPrune's targets: per layer name, its outputs on every window of ``inputs`` when
    the dense copy of the block runs (``dense``: the copy and its layers by name). With
    ``advance`` the same pass also makes ``inputs`` the next block's (:func:`_advance`)."""
    block, layers = dense
    outputs = {name: [] for name in layers}
    handles = [layer.register_forward_hook(lambda module, args, out, kept=outputs[name]: kept.append(out.detach()))
               for name, layer in layers.items()]
    try:
        if advance:
            _advance(block, inputs)
        else:
            for args, kwargs in inputs:
                block(*args, **kwargs)
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


def _prune_block(prefix, block, targets, inputs, dense_inputs, recipe):
    entries = [LayerReport(name, list(layer.weight.shape), f"left dense: {reason}")
               for name, layer, reason in targets if reason is not None]
    live = [(name, layer) for name, layer, reason in targets if reason is None]
    needs = recipe.step.NEEDS | ({"hessian"} if recipe.refit else set())
    stats, permutations = None, {}
    if recipe.permute:  # a permutation needs every layer's statistics first
        stats, _ = _gather(block, live, inputs, needs)
        _release_freed_memory()
        permutations = _permute_block(prefix, block, inputs[0], dict(live), stats, recipe)
        for entry in entries:
            if entry.name in permutations:
                entry.permutation = permutations[entry.name][2]
    dense = dense_outputs = None
    advanced = False
    if dense_inputs is not None:
        # The block as the dense model has it (permuted, not yet pruned), beside it: what the
        # fits aim at is computed again on every pass instead of kept (for a 7B model and
        # 128 x 2048 tokens, its layers' outputs would be 45 GB a block).
        memo = {}
        dense = (copy.deepcopy(block, memo), {name: memo[id(layer)] for name, layer in live})
        if "dense_outputs" in needs:
            # without refit nothing reads the dense inputs again: one pass gives the targets
            # and the next block's dense inputs
            advanced = not recipe.refit
            dense_outputs = _dense_outputs(dense, dense_inputs, advanced)
    waiting = dict(live)
    while waiting:
        if recipe.refit or stats is None:
            # With refit the layers still waiting read what the pruned ones compute now: gather
            # again, as far as the next layers that share an input.
            stats, fits = _gather(block, list(waiting.items()), inputs, needs,
                                  (dense, dense_inputs) if recipe.refit else None, first_group=recipe.refit)
        group = [name for name in stats if stats[name] is stats[next(iter(stats))]] if recipe.refit else list(stats)
        for name in group:
            layer = waiting.pop(name)
            kept = stats.pop(name)  # statistics shared by several layers go with the last of them
            kept.dense_outputs = None if dense_outputs is None else dense_outputs.pop(name)
            weight = dense_sample = None
            if recipe.refit and not isinstance(layer, CONVOLUTIONS):
                cross, dense_sample = fits.pop(name)
                dense_weight = linear_weight(layer).detach().float()
                # the dense outputs less the bias are X_d W^T: (Y - b)^T X = W X_d^T X
                weight = refit_weight(dense_weight, kept, dense_weight.double() @ cross, recipe.refit_dampening)
            entry = _prune_layer(name, layer, kept, recipe, weight, dense_sample)
            del kept
            if name in permutations:
                entry.permutation_gain, entry.permutation_seconds, entry.permutation = permutations[name]
            entries.append(entry)
            _release_freed_memory()
    if dense is not None and not advanced:
        _advance(dense[0], dense_inputs)
    return entries


def refit_weight(weight, stats, cross, dampening):
    """Refit a layer's weight to the dense model's outputs on the inputs it now receives.

    Returns ``argmin ||X W^T + b - Y||^2 + lambda ||W - W0||^2``, with ``X`` the pruned
    model's inputs of the layer, ``Y`` the dense model's outputs, ``b`` the layer's bias (the
    same in both, so it drops out) and ``lambda`` the dampening as a fraction of the mean of
    ``diag(X^T X)``.

    Since ``||X W^T - (Y - b)||^2 = ||X (W - W*)^T||^2 + const`` for this ``W*``, a score
    that minimises ``||X (W - W0)^T||^2`` over masked ``W`` (SparseGPT, ALPS), given ``W*``
    for ``W0``, minimises the error against the dense model's outputs instead: the errors
    of the layers pruned before this one are corrected, not copied.

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        The dense weight ``W0``, float32.
    stats : LayerStatistics
        The layer's inputs' statistics (``hessian``: ``X^T X``).
    cross : Tensor, shape (out, in)
        ``(Y - b)^T X``, float64. :func:`prune` gets it as ``W0 X_d^T X``, ``X_d`` the dense
        model's inputs of the layer.
    dampening : float
        ``lambda`` as a fraction of the mean of ``diag(X^T X)``.

    Returns
    -------
    Tensor, shape (out, in)
        ``W*``, float32.

    Examples
    --------
    Outputs another weight computes are found again (a tiny dampening barely pulls back):

    >>> import torch
    >>> from transposable.scores.base import LayerStatistics
    >>> x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    >>> stats = LayerStatistics({"hessian"})
    >>> stats.add(x)
    >>> target = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    >>> y = x @ target.t()
    >>> refit = refit_weight(torch.zeros(1, 4), stats, y.t().double() @ x.double(), 1e-9)
    >>> torch.allclose(refit, target, atol=1e-4)
    True
    """
    hessian = stats.hessian
    damp = dampening * float(hessian.diagonal().mean())
    lhs = hessian + damp * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    rhs = cross.double() + damp * weight.double()
    factor = torch.linalg.cholesky(lhs)
    return torch.cholesky_solve(rhs.t(), factor).t().float()


class _GroupGathered(Exception):
    """Raised by :func:`_gather`'s hooks once the first layers that share an input have theirs."""


def _gather(block, live, inputs, needs, dense=None, first_group=False):
    """Run the block on every window and gather each live layer's input statistics.

    Layers that read the same tensor (q, k and v; gate and up) share one
    :class:`~transposable.scores.base.LayerStatistics`: one Hessian computed, stored and
    factored for all of them. Sharing is decided on the first window (the same tensor
    object) and checked on every other. The statistics come in the order the layers run.

    With ``dense`` (the block's dense copy with its layers by name, and the dense model's
    inputs of the block) the copy runs on each window first, and each linear layer also
    gets, shared as its statistics are, ``[X_d^T X, X_d of the first window]``: ``X_d`` its
    inputs in the dense model, which :func:`refit_weight` needs. With ``first_group``, only
    the first layers to run (and those sharing their input) are gathered, and each window's
    passes stop there.
    """
    stats, leader, latest, fits = {}, {}, {}, {}
    readers = {}  # on the first window: id of an input tensor -> (the first layer reading it, the tensor)
    dense_seen = {}  # this window's inputs of the dense copy's layers

    def record(name, layer, x):
        if name not in leader:
            first = readers.get(id(x))
            shared = first is not None and first[1] is x
            if first_group and stats and not shared:  # the first layer past the first group
                raise _GroupGathered
            leader[name] = first[0] if shared else name
            if leader[name] == name:
                readers[id(x)] = (name, x)  # held for the window, so that its id is not reused
                stats[name] = LayerStatistics(needs)
            else:
                stats[name] = stats[leader[name]]
                if leader[name] in fits:
                    fits[name] = fits[leader[name]]
        if leader[name] == name:
            stats[name].add(x)
            latest[name] = x
            if dense is not None and not isinstance(layer, CONVOLUTIONS):
                xd = dense_seen[name]
                product = (xd.reshape(-1, xd.shape[-1]).float().t() @ x.detach().reshape(-1, x.shape[-1]).float())
                if name in fits:
                    fits[name][0].add_(product.double())
                else:
                    fits[name] = [product.double(), xd]
        elif latest[leader[name]] is not x:
            raise RuntimeError(f"layer {name!r} read the same input as {leader[name]!r} on the first calibration "
                               "window but not on a later one; the block's forward depends on its inputs")

    def record_dense(name, x):
        if first_group and dense_seen and not any(x is seen for seen in dense_seen.values()):
            raise _GroupGathered
        dense_seen[name] = x.detach()

    handles = [layer.register_forward_pre_hook(lambda module, args, name=name, layer=layer: record(name, layer,
                                                                                                    args[0]))
               for name, layer in live]
    if dense is not None:
        (dense_block, dense_layers), dense_inputs = dense
        handles += [dense_layers[name].register_forward_pre_hook(lambda module, args, name=name: record_dense(
            name, args[0])) for name, _ in live]
    try:
        for window, (args, kwargs) in enumerate(inputs):
            if dense is not None:
                _run_to_the_group(dense_block, *dense_inputs[window])
            _run_to_the_group(block, args, kwargs)
            readers.clear()
            latest.clear()
            dense_seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return stats, fits


def _run_to_the_group(block, args, kwargs):
    """Run ``block``; a hook of :func:`_gather` may stop it past the layers it gathers."""
    try:
        block(*args, **kwargs)
    except _GroupGathered:
        pass


def _permute_block(prefix, block, sample, layers, stats, recipe):
    """Permute the block's permutable dimensions on the calibration scores of its layers,
    and move the statistics of the layers' inputs along.

    A score that walks a layer's inputs in order (SparseGPT: it spreads each error over the
    inputs still to come) gives a weight per input feature (``input_priority``); the groups
    are then placed by decreasing weight, summed over the layers that read the dimension
    (for SparseGPT the Hessian's diagonal, as GPTQ's "act order"): the order matters as much
    as the grouping (benchmarks/README.md, issue 17).

    The block's outputs on ``sample`` are compared before and after: a block whose layers
    are named like a known layout but compute something else is put back as it was, with a
    warning. Returns ``{layer name: (gain or None, search seconds, {"axis", "positions"})}``
    for every permuted layer."""
    step = recipe.step
    args, kwargs = sample
    before = _hidden(block(*args, **kwargs)).double()
    scores = {name: step.importance(linear_weight(layers[name]).detach().double(), kept, recipe.options)
              for name, kept in stats.items()}
    done, permuted = [], {}
    for dimension in permutable_dimensions(block, prefix):
        moved = set()  # a layer's statistics are moved once, even where layers share them
        readers = {name: step.input_priority(stats[name]) for name, _, axis, _ in dimension.members
                   if axis == 1 and name in stats}
        priority = None
        if any(weights is not None for weights in readers.values()):  # heaviest groups first
            priority = np.zeros(dimension.size)
            for name, _, axis, index in dimension.members:
                if axis == 1 and name in readers:
                    weights = readers[name].cpu().numpy()
                    inside = index >= 0
                    np.add.at(priority, index[inside], weights[inside] / max(weights.mean(), 1e-300))
        report = permute_dimension(dimension, {name: scores[name] for name, *_ in dimension.members if name in scores},
                                   recipe.pattern, transposable=recipe.transposable, seconds=recipe.permute_seconds,
                                   priority=priority)
        done.append((dimension, report.order))
        for name, _, axis, index in dimension.members:
            positions = torch.as_tensor(dimension.positions(report.order, index))
            permuted[name] = (report.layers.get(name), report.seconds, {"axis": axis, "positions": positions.tolist()})
            if axis == 1 and name in stats and id(stats[name]) not in moved:
                stats[name].permute_inputs(positions)
                moved.add(id(stats[name]))
    after = _hidden(block(*args, **kwargs)).double()
    change = float((after - before).norm() / before.norm().clamp_min(1e-300))
    if change > (1e-4 if before.dtype == torch.float32 or _dtype(block) == torch.float32 else 1e-2):
        for dimension, order in reversed(done):
            apply_permutation(dimension, np.argsort(order))
        log.warning("block %s: the channel permutations changed its outputs (relative %.2g): its layers are named "
                    "like a known layout but compute something else; it is pruned unpermuted", prefix or "model",
                    change)
        for kept in {id(kept): kept for kept in stats.values()}.values():
            kept.restore_inputs()
        return {}
    return permuted


def _dtype(module):
    return next((p.dtype for p in module.parameters()), torch.float32)


def _prune_layer(name, layer, stats, recipe, refit=None, dense_sample=None):
    """Prune one layer by the recipe's score; with ``refit`` (the refitted weight) the score
    prunes that instead, and the errors are measured against the dense model's outputs (the
    layer's dense weight on ``dense_sample``, its inputs in the dense model on the first
    window) rather than against the layer's own dense weight on its inputs."""
    start = time.perf_counter()
    # (out, in[, *kernel]), float32: for a float32 layer its own values, which stay as they
    # are until the layer is written at the end (no copy: a 7B layer's copy is 180 MB).
    weight = linear_weight(layer).detach().float()
    source = weight if refit is None else refit
    keep, new, new_bias = recipe.step.prune(layer, source, stats, recipe)
    bias = None if layer.bias is None else layer.bias.detach().float().clone()
    sample = stats.sample if dense_sample is None else dense_sample
    target = layer_outputs(layer, as_stored(layer, weight), bias, sample)
    masked = as_stored(layer, source * keep)
    new_weight = masked if new is None else as_stored(layer, new)
    new_bias = bias if new_bias is None else new_bias
    error_masked = _relative_error(layer, (masked, bias), target, stats.sample)
    error = _relative_error(layer, (new_weight, new_bias), target, stats.sample)
    kept = kept_fraction(weight, keep)  # before the layer (maybe weight itself) is written
    with torch.no_grad():
        layer.weight.copy_(new_weight.to(layer.weight.dtype))
        if new_bias is not None:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))
    return LayerReport(name, list(layer.weight.shape), "pruned", kept, error_masked, error,
                       time.perf_counter() - start)


def _relative_error(layer, candidate, target, x):
    """``||f(x; candidate) - target||^2 / ||target||^2``."""
    ours, theirs = layer_outputs(layer, *candidate, x).double(), target.double()
    return float((ours - theirs).pow(2).sum() / theirs.pow(2).sum().clamp_min(1e-300))
