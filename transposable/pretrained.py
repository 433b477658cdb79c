"""Pruning Hugging Face model folders: ``transposable prune``.

A model folder (``config.json``, tokenizer files, one or more ``.safetensors`` files or a
``pytorch_model.bin``) is loaded with ``transformers`` (``pip install transformers``, or ``pip install '.[llm]'`` in the checkout),
pruned by :func:`transposable.prune.prune` on windows of a calibration text, and written
as a new folder, all or nothing: every file but the checkpoint is copied as it is, the
checkpoint is rewritten through the library's file formats with the pruned tensors in
their stored dtype and every other tensor copied byte for byte, and
``pruning_report.json`` records what happened to each layer.
"""
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

from .formats import FORMATS, format_of, mask_metadata
from .io import atomic_directory, check_readable
from .masks import check_flag, resolve_method
from .patterns import parse_pattern
from .permute import check_budget

#: The report written into every pruned folder.
REPORT_NAME = "pruning_report.json"


def prune_pretrained(model_dir, output, calibration_file, pattern, *, transposable=True, score="sparsegpt",
                     method="auto", samples=128, seqlen=512, seed=0, permute=False, permute_seconds=1.0, force=False,
                     progress=False, log_block=None):
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
    score : {"sparsegpt", "wanda", "magnitude", "adaprune"}
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
    force : bool, default False
        Replace an existing ``output``.
    progress : bool, default False
        A progress bar over blocks.
    log_block : callable, optional
        Called with one line per finished block.

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
        If the folder, its checkpoint or the calibration file is missing.
    ValueError
        For bad settings, a calibration file that is not UTF-8 text, an empty or too short
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
    from .prune import check_score, prune

    # Everything that can be checked is checked before the model loads (tens of seconds).
    pattern = parse_pattern(pattern)
    method = resolve_method(method, pattern, transposable=transposable)
    check_score(score)
    check_flag("permute", permute)
    check_budget(permute_seconds, None)
    model_dir, output = Path(model_dir), Path(output)
    for name, value in (("samples", samples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    checkpoint = find_checkpoint(model_dir)
    text = read_text(calibration_file)
    if output.resolve() == model_dir.resolve():
        raise ValueError(f"output '{output}' is the model folder; inputs are never overwritten")
    with atomic_directory(output, force=force) as folder:  # refuses an existing output before any work
        transformers = _transformers()
        if not progress:  # one line per block, not transformers' own loading bars
            transformers.utils.logging.disable_progress_bar()
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        batches = calibration_windows(tokenizer, text, samples, seqlen, seed)
        model = _load_model(transformers, model_dir)

        layers = []
        prune(model, batches, pattern, transposable=transposable, score=score, method=method, permute=permute,
              permute_seconds=permute_seconds, report=layers, progress=progress, log_block=log_block)
        metadata = {**mask_metadata(pattern, transposable, method), "transposable.score": score}
        report = {"model": str(model_dir), "calibration": str(calibration_file), "pattern": str(pattern),
                  "transposable": transposable, "score": score, "method": method, "samples": samples,
                  "seqlen": seqlen, "seed": seed, "permute": permute,
                  **({"permute_seconds": permute_seconds} if permute else {}), "summary": _summary(layers),
                  "layers": [asdict(layer) for layer in layers]}
        # AdaPrune refits biases; a permutation moves a writer's bias (a reader's is rewritten unchanged).
        modules = dict(model.named_modules())
        changed = []
        for layer in layers:
            if layer.status == "pruned" or layer.permutation:
                changed.append(f"{layer.name}.weight")
            if (layer.permutation or (layer.status == "pruned" and score == "adaprune")) and \
                    getattr(modules[layer.name], "bias", None) is not None:
                changed.append(f"{layer.name}.bias")
        write_model_folder(model, model_dir, checkpoint, folder, changed, metadata)
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def find_checkpoint(model_dir):
    """The checkpoint file of a model folder and the format module that reads it.

    A sharded index, a ``.safetensors`` file, or a PyTorch file (``pytorch_model.bin``).

    Parameters
    ----------
    model_dir : str or Path
        The folder.

    Returns
    -------
    (Path, module)
        The checkpoint path and its format.

    Raises
    ------
    FileNotFoundError
        If the folder or its ``config.json`` is missing, or it holds no checkpoint.
    NotADirectoryError
        If ``model_dir`` is a file.
    ValueError
        If it holds several checkpoints of different kinds.

    Examples
    --------
    >>> find_checkpoint("/nowhere")
    Traceback (most recent call last):
    ...
    FileNotFoundError: model folder '/nowhere' does not exist
    """
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise NotADirectoryError(f"'{model_dir}' is a file, not a model folder; give the folder that holds "
                                 "config.json, the tokenizer and the weights")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder '{model_dir}' does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"'{model_dir}' has no config.json: give a Hugging Face model folder")
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    for kind in ("sharded", "safetensors", "pt"):
        found = [p for p in files if FORMATS[kind].matches(p)]
        if kind == "pt":
            found = [p for p in found if p.name.startswith("pytorch_model")]
        if len(found) == 1:
            return found[0], FORMATS[kind]
        if len(found) > 1:
            raise ValueError(f"'{model_dir}' holds {len(found)} {FORMATS[kind].DESCRIPTION} checkpoints "
                             f"({', '.join(p.name for p in found[:3])}); keep one")
    raise FileNotFoundError(f"'{model_dir}' holds no model.safetensors, *.safetensors.index.json or "
                            f"pytorch_model.bin")


def calibration_windows(tokenizer, text, samples, seqlen, seed=0):
    """``samples`` windows of ``seqlen`` consecutive tokens of ``text``, at seeded random starts.

    Parameters
    ----------
    tokenizer : callable
        A Hugging Face tokenizer (called as ``tokenizer(text, add_special_tokens=False)``).
    text : str
        The calibration text.
    samples, seqlen : int
        How many windows, and how long.
    seed : int, default 0
        Seeds the starts.

    Returns
    -------
    list of Tensor
        ``samples`` tensors of token ids, shape ``(1, seqlen)``.

    Raises
    ------
    ValueError
        If the text is empty or shorter than ``seqlen`` tokens.

    Examples
    --------
    >>> characters = lambda text, add_special_tokens: {"input_ids": [ord(c) for c in text]}
    >>> [w.tolist() for w in calibration_windows(characters, "abcdef", 2, 3, seed=1)]
    [[[98, 99, 100]], [[100, 101, 102]]]
    """
    import torch

    if not text.strip():
        raise ValueError("the calibration text is empty; give a file of real text (a few thousand words or more)")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if len(ids) < seqlen:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {seqlen}; give "
                         f"more text or a smaller --seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (samples,), generator=generator)
    return [ids[start:start + seqlen][None] for start in starts.tolist()]


def read_text(path, what="calibration file"):
    """The text of a UTF-8 text file, or a one-line error naming the file.

    Parameters
    ----------
    path : str or Path
        A UTF-8 text file.
    what : str, default "calibration file"
        What the file is, for the messages.

    Returns
    -------
    str
        Its text.

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError
        If the file is missing, a folder or unreadable.
    ValueError
        If it is not UTF-8 text, or holds nothing but white space.

    Examples
    --------
    >>> import tempfile
    >>> binary = tempfile.NamedTemporaryFile(suffix=".bin", delete=False)
    >>> _ = binary.write(bytes([0xff, 0xfe, 0x00])); binary.close()
    >>> read_text(binary.name)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: calibration file '....bin' is not UTF-8 text (byte 0 is 0xff); give a plain text file
    """
    check_readable(path)
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} '{path}' is not UTF-8 text (byte {error.start} is "
                         f"0x{raw[error.start]:02x}); give a plain text file") from None
    if not text.strip():
        raise ValueError(f"{what} '{path}' is empty; give a file of real text (a few thousand words or more)")
    return text


def _load_model(transformers, model_dir):
    """The folder's model in float32, or one line saying its weights do not fit its config
    (transformers would log every missing tensor and hand back a randomly initialized model)."""
    import torch

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        model, loading = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                           output_loading_info=True)
    except RuntimeError as error:  # shapes that do not fit the config
        raise ValueError(f"the weights in '{model_dir}' do not match its config.json: "
                         f"{str(error).strip().splitlines()[-1].strip()}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    missing = sorted(loading["missing_keys"])
    if missing or loading["mismatched_keys"]:
        unexpected = sorted(loading["unexpected_keys"])
        raise ValueError(f"the weights in '{model_dir}' do not match its config.json (model_type "
                         f"{model.config.model_type!r}): {len(missing)} of the model's tensors are not in the checkpoint"
                         + (f" (e.g. {missing[0]!r})" if missing else "")
                         + (f" and {len(unexpected)} of the checkpoint's are not in the model (e.g. {unexpected[0]!r})"
                            if unexpected else "")
                         + "; give the config.json saved with these weights")
    return model


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("transposable prune needs transformers: pip install 'transformers>=5.23' (or "
                          "pip install '.[llm]' in the transposable checkout)") from None
    return transformers


def _summary(layers):
    pruned = [layer for layer in layers if layer.status == "pruned"]
    weights = sum(math.prod(layer.shape) for layer in pruned)
    return {"pruned": len(pruned), "left_dense": len(layers) - len(pruned), "pruned_weights": weights,
            "kept_l1": sum(layer.kept_l1 * math.prod(layer.shape) for layer in pruned) / weights if weights else None,
            "mean_error": sum(layer.error for layer in pruned) / len(pruned) if pruned else None,
            "mean_error_masked": sum(layer.error_masked for layer in pruned) / len(pruned) if pruned else None,
            "seconds": sum(layer.seconds for layer in pruned)}


class PrunedTensors:
    """A converter that writes the pruned values and lets the format copy the rest.

    For the format modules (see :class:`transposable.convert.Converter`): the tensors
    pruning changed get the pruned model's values; every other tensor is copied byte for
    byte.

    Parameters
    ----------
    values : dict of str to Tensor
        Checkpoint names and their new values (cast to each tensor's stored dtype).

    Examples
    --------
    >>> import torch
    >>> converter = PrunedTensors({"fc.weight": torch.zeros(2, 2)})
    >>> converter.wants("fc.bias", (2,), "f32", True), converter.wants("fc.weight", (2, 2), "f32", True)
    (False, True)
    >>> converter("fc.weight", torch.ones(2, 2, dtype=torch.bfloat16)).dtype
    torch.bfloat16
    """

    def __init__(self, values):
        self.values, self.written = values, set()

    def begin(self, total):
        """Nothing to show: pruning had its own progress."""

    def close(self):
        """Nothing to close."""

    def wants(self, name, shape, dtype, is_float):
        """Whether this tensor is one pruning changed."""
        return name in self.values

    def __call__(self, name, tensor):
        value = self.values[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint but "
                             f"{tuple(value.shape)} in the model")
        self.written.add(name)
        return value.detach().to(tensor.dtype).contiguous()


def write_model_folder(model, model_dir, checkpoint, folder, changed, metadata, replaced=(REPORT_NAME,)):
    """Write a model folder: a changed model's checkpoint beside its folder's other files.

    The model folder's other files are copied as they are (but ``replaced``), and its
    checkpoint is rewritten with the parameters named in ``changed`` taken from ``model``
    (in each tensor's stored dtype) and every other tensor copied byte for byte.

    Parameters
    ----------
    model : nn.Module
        The changed model.
    model_dir : Path
        The folder it was loaded from.
    checkpoint : (Path, module)
        Its checkpoint, as :func:`find_checkpoint` returns it.
    folder : Path
        The folder to fill.
    changed : iterable of str
        Parameter names of ``model`` whose values replace the checkpoint's.
    metadata : dict
        Added to the checkpoint's metadata.
    replaced : tuple of str
        File names not to copy (the caller writes its own).

    Raises
    ------
    ValueError
        If a changed parameter has no tensor in the checkpoint (tied parameters may be
        missing: they are written through the tensor they share).

    Examples
    --------
    ::

        write_model_folder(model, Path("SmolLM2-135M"), find_checkpoint("SmolLM2-135M"), Path("out"),
                           [name for name, _ in model.named_parameters()], {"note": "fine-tuned"})
    """
    path, fmt = checkpoint
    inputs = set(fmt.files(path))
    for item in model_dir.iterdir():
        if item.is_file() and item not in inputs and item.name not in replaced:
            shutil.copyfile(item, folder / item.name)
    names = set(fmt.names(path))
    prefix = getattr(model, "base_model_prefix", "")
    parameters = dict(model.named_parameters())
    values = {_checkpoint_name(name, names, prefix): parameters[name] for name in changed if name in parameters}
    outputs = fmt.output_files(path, folder / path.name)
    converter = PrunedTensors(values)
    fmt.convert(path, folder / path.name, {Path(out): out for out in outputs}, converter, metadata)
    missing = sorted(set(values) - converter.written)
    if missing:
        raise ValueError(f"the checkpoint did not hold {len(missing)} changed tensor(s), e.g. {missing[0]!r}")


def _checkpoint_name(name, names, prefix):
    """The checkpoint's key for a model parameter (with or without the base model's prefix)."""
    candidates = [name]
    if prefix:
        candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise ValueError(f"the checkpoint has no tensor for the pruned parameter {name!r}")
