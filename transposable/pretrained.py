"""Pruning Hugging Face model folders: ``transposable prune``.

A model folder (``config.json``, tokenizer files, one or more ``.safetensors`` files or a
``pytorch_model.bin``) is loaded with ``transformers`` (``pip install transformers``, or
``pip install '.[llm]'`` in the checkout), pruned by :func:`transposable.prune.prune_model` on
windows of a calibration text as a :class:`~transposable.prune.PruneRecipe` says, and written
as a new folder, all or nothing: every file but the checkpoint is copied as it is, the
checkpoint is rewritten through the library's file formats with the pruned tensors in
their stored dtype and every other tensor copied byte for byte, and
``pruning_report.json`` records the recipe and what happened to each layer. Reading,
streaming and writing folders is :mod:`transposable.folders`.
"""
import json
import math
from dataclasses import asdict
from pathlib import Path

from .folders import (REPORT_NAME, CheckpointTensors, StreamedBlocks,  # noqa: F401  (public here too)
                      calibration_windows, changed_parameters, load_model, read_text, require_transformers,
                      write_checkpoint_folder, write_model_folder)
from .formats import find_checkpoint, mask_metadata  # noqa: F401  (public here too)
from .io import atomic_directory, check_folder
from .masks import check_flag


def prune_pretrained(model_dir, output, calibration_file, pattern, *, transposable=True, score="sparsegpt",
                     method="auto", samples=128, seqlen=512, seed=0, permute=False, permute_seconds=1.0, refit=False,
                     refit_dampening=1.0, device=None, stream=True, offload_activations=None, force=False,
                     progress=False, log_block=None, options=None):
    """Prune a Hugging Face causal language model folder into a new folder.

    Parameters
    ----------
    model_dir : str or Path
        A folder ``from_pretrained`` loads: ``config.json``, a tokenizer, and the weights
        as ``.safetensors`` (single or sharded) or ``pytorch_model.bin``.
    output : str or Path
        The new folder (it must not exist, unless ``force``).
    calibration_file : str or Path
        UTF-8 text; ``samples`` windows of ``seqlen`` tokens are drawn from it.
    pattern : str or tuple
        ``"2:4"``, ``"16:32"``, ...
    transposable : bool, default True
        Transposable masks.
    score : {"sparsegpt", "wanda", "magnitude", "adaprune", "alps"}
        As in :func:`transposable.prune.prune`.
    method : str, default "auto"
        The transposable solver.
    samples : int, default 128
        Calibration windows.
    seqlen : int, default 512
        Tokens per window.
    seed : int, default 0
        Where the windows start (reproducible).
    permute : bool, default False
        Permute channels before masking (:func:`transposable.prune.prune`); the folder then
        holds the permuted weights, which compute what the originals did.
    permute_seconds : float, default 1.0
        Search budget per permuted dimension.
    refit : bool, default False
        Prune each block's layers group by group, each refitted to the dense model's
        outputs on the inputs the pruned layers give it (:func:`transposable.prune.prune`).
    refit_dampening : float, default 1.0
        The refit's pull back to the dense weight (:func:`transposable.prune.prune`).
    device : str, optional
        ``"cpu"`` or ``"cuda"`` / ``"cuda:k"``: where the blocks, the activations and the
        solvers run (default: ``"cuda"`` when present, else ``"cpu"``).
    stream : bool, default True
        Hold one block at a time: the model is built without weights, each block's tensors
        are read from the checkpoint when its turn comes and its pruned tensors are written
        out (to a temporary file in the output) when it is done. Memory is one block, its
        statistics and the activations, not the model. ``stream=False`` loads the whole
        model with ``from_pretrained`` (the same results).
    offload_activations : str or Path, optional
        Keep the calibration hidden states in a temporary file in this folder instead of
        memory: ``samples x seqlen x hidden_size x 4`` bytes (float32), twice that for
        AdaPrune and ``refit``.
    force : bool, default False
        Replace an existing ``output``.
    progress : bool, default False
        A progress bar over blocks.
    log_block : callable, optional
        Called with one line per finished block.
    options : mapping, optional
        The score's own options (``dampening``, ALPS's ``rho``, ...; see
        :class:`transposable.prune.PruneRecipe`).

    Returns
    -------
    dict
        The report also written to ``output / REPORT_NAME``: the settings, one entry per
        layer (:class:`transposable.prune.LayerReport` fields) and a summary.

    Raises
    ------
    ImportError
        If ``transformers`` is not installed.
    FileExistsError
        If ``output`` exists and ``force`` is False (checked before any work).
    FileNotFoundError
        If the folder, its checkpoint, the calibration file or ``offload_activations`` is
        missing.
    ValueError
        For bad settings (a device that is not here), a calibration file that is not UTF-8 text, an empty or too short
        calibration text (all checked before the model loads), weights that do not match
        the folder's ``config.json``, or a model no layer of which tiles at ``pattern``
        (see :func:`transposable.prune.prune`).

    Examples
    --------
    ::

        report = prune_pretrained("SmolLM2-135M", "SmolLM2-135M-16of32", "calibration.txt", "16:32",
                                  score="sparsegpt", samples=64, seqlen=512)
        report["summary"]["pruned"]
    """
    from .prune import PruneRecipe

    recipe = PruneRecipe(pattern, transposable=transposable, score=score, method=method, options=options or {},
                         permute=permute, permute_seconds=permute_seconds, refit=refit,
                         refit_dampening=refit_dampening)
    return prune_folder(model_dir, output, calibration_file, recipe, samples=samples, seqlen=seqlen, seed=seed,
                        device=device, stream=stream, offload_activations=offload_activations, force=force,
                        progress=progress, log_block=log_block)


def prune_folder(model_dir, output, calibration_file, recipe, *, samples=128, seqlen=512, seed=0, device=None,
                 stream=True, offload_activations=None, force=False, progress=False, log_block=None):
    """Prune a Hugging Face causal language model folder as ``recipe`` says, into a new folder.

    What :func:`prune_pretrained` and the ``prune`` command run.

    Parameters
    ----------
    model_dir : str or Path
        The model folder (see :func:`prune_pretrained`).
    output : str or Path
        The new folder (it must not exist, unless ``force``).
    calibration_file : str or Path
        UTF-8 text; ``samples`` windows of ``seqlen`` tokens are drawn from it.
    recipe : PruneRecipe
        The pattern, score and its options, solver, layers and permutations
        (:class:`transposable.prune.PruneRecipe`); recorded in the report.
    samples : int, default 128
        Calibration windows.
    seqlen : int, default 512
        Tokens per window.
    seed : int, default 0
        Where the windows start (reproducible).
    device : str, optional
        Where the blocks, the activations and the solvers run (see :func:`prune_pretrained`).
    stream : bool, default True
        Hold one block at a time (see :func:`prune_pretrained`).
    offload_activations : str or Path, optional
        Keep the calibration hidden states in a temporary file in this folder.
    force : bool, default False
        Replace an existing ``output``.
    progress : bool, default False
        A progress bar over blocks.
    log_block : callable, optional
        Called with one line per finished block.

    Returns
    -------
    dict
        The report also written to ``output / REPORT_NAME`` (see :func:`prune_pretrained`),
        with the whole recipe under ``"recipe"``.

    Raises
    ------
    TypeError
        If ``recipe`` is not a :class:`~transposable.prune.PruneRecipe`.
    ImportError, FileExistsError, FileNotFoundError, ValueError
        As :func:`prune_pretrained`, before any work.

    Examples
    --------
    ::

        recipe = PruneRecipe("2:4", score="sparsegpt", options={"dampening": 0.05}, permute=True)
        report = prune_folder("SmolLM2-135M", "SmolLM2-135M-T2of4", "calibration.txt", recipe, samples=32)
    """
    from .prune import PruneRecipe, prune_model

    if not isinstance(recipe, PruneRecipe):
        raise TypeError(f"recipe must be a PruneRecipe, got {type(recipe).__name__}")
    # Everything that can be checked is checked before the model loads (tens of seconds).
    model_dir, output = Path(model_dir), Path(output)
    for name, value in (("samples", samples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_flag("stream", stream)
    device = resolve_device(device)
    if offload_activations is not None:
        check_folder(offload_activations, "offload_activations")
    checkpoint = find_checkpoint(model_dir)
    text = read_text(calibration_file)
    if output.resolve() == model_dir.resolve():
        raise ValueError(f"output '{output}' is the model folder; inputs are never overwritten")
    with atomic_directory(output, force=force) as folder:  # refuses an existing output before any work
        transformers = require_transformers()
        if not progress:  # one line per block, not transformers' own loading bars
            transformers.utils.logging.disable_progress_bar()
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        batches = [window.to(device) for window in calibration_windows(tokenizer, text, samples, seqlen, seed)]
        loader = None
        if stream:
            loader = StreamedBlocks(transformers, model_dir, checkpoint, device, folder / ".pruned-blocks",
                                    recipe.score)
            model = loader.model
        else:
            model = load_model(transformers, model_dir).to(device)

        layers = []
        prune_model(model, batches, recipe, report=layers, progress=progress, log_block=log_block,
                    offload_activations=offload_activations, block_loader=loader)
        pattern, transposable = recipe.pattern, recipe.transposable
        metadata = {**mask_metadata(pattern, transposable, recipe.method), "transposable.score": recipe.score}
        report = {"model": str(model_dir), "calibration": str(calibration_file), "pattern": str(pattern),
                  "transposable": transposable, "score": recipe.score, "method": recipe.method, "samples": samples,
                  "seqlen": seqlen, "seed": seed, "permute": recipe.permute,
                  **({"permute_seconds": recipe.permute_seconds} if recipe.permute else {}), "device": str(device),
                  "stream": stream, "recipe": recipe.as_dict(), "summary": _summary(layers),
                  "layers": [asdict(layer) for layer in layers]}
        if loader is None:
            changed = changed_parameters(model, layers, recipe.step.CHANGES_BIAS)
            write_model_folder(model, model_dir, checkpoint, folder, changed, metadata)
        else:
            write_checkpoint_folder(model_dir, checkpoint, folder, loader.written, metadata)
            loader.close()
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def resolve_device(device):
    """Return the ``torch.device`` to prune on: ``device``, or CUDA when present, else the CPU.

    Parameters
    ----------
    device : str, torch.device or None
        ``"cpu"``, ``"cuda"``, ``"cuda:K"``, or None for the default.

    Returns
    -------
    torch.device
        The device, checked to be on this machine.

    Raises
    ------
    ValueError
        If ``device`` is not a device name, or names a device this machine lacks.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu:9")
    Traceback (most recent call last):
    ...
    ValueError: device 'tpu:9' is not a device name; use cpu, cuda or cuda:K
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:K") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:K")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise ValueError(f"device {device!r} is not here (this machine has {count} CUDA device(s)); use "
                             f"{'cpu' if not count else 'cuda:0'}")
    return resolved


def _summary(layers):
    pruned = [layer for layer in layers if layer.status == "pruned"]
    weights = sum(math.prod(layer.shape) for layer in pruned)
    return {"pruned": len(pruned), "left_dense": len(layers) - len(pruned), "pruned_weights": weights,
            "kept_l1": sum(layer.kept_l1 * math.prod(layer.shape) for layer in pruned) / weights if weights else None,
            "mean_error": sum(layer.error for layer in pruned) / len(pruned) if pruned else None,
            "mean_error_masked": sum(layer.error_masked for layer in pruned) / len(pruned) if pruned else None,
            "seconds": sum(layer.seconds for layer in pruned)}
