"""Hugging Face model folders: find, read, stream and write them.

What the folder commands (``transposable prune`` and ``transposable finetune``) share: the
calibration and training texts (:func:`read_text`, :func:`calibration_windows`), the model
loaded whole (:func:`load_model`) or built without weights and read one block at a time
(:class:`StreamedBlocks`, over :class:`CheckpointTensors`), and the new folder written
with the changed tensors in their stored dtypes and every other tensor and file as it was
(:func:`write_model_folder`, :func:`write_checkpoint_folder`). ``transformers`` is imported
when a function needs it (:func:`require_transformers`).
"""
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from .io import check_readable

#: The report ``transposable prune`` writes into every pruned folder (and ``finetune`` reads).
REPORT_NAME = "pruning_report.json"



def changed_parameters(model, layers, changes_bias):
    """The names of the parameters pruning changed, from its layer reports.

    A pruned or permuted layer's weight; its bias when permuted along its outputs (a
    reader's bias is rewritten unchanged) or refitted (``changes_bias``: the score fits
    biases, as AdaPrune does).

    Parameters
    ----------
    model : nn.Module
        The pruned model.
    layers : list of LayerReport
        What pruning reported (:class:`transposable.prune.LayerReport`).
    changes_bias : bool
        Whether the score refits the biases of the layers it prunes.

    Returns
    -------
    list of str
        Parameter names, as ``model.named_parameters()`` gives them.

    Examples
    --------
    >>> import torch
    >>> from transposable.prune import LayerReport
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> changed_parameters(model, [LayerReport("0", [4, 4], "pruned")], changes_bias=True)
    ['0.weight', '0.bias']
    """
    modules = dict(model.named_modules())
    changed = []
    for layer in layers:
        if layer.status == "pruned" or layer.permutation:
            changed.append(f"{layer.name}.weight")
        if (layer.permutation or (layer.status == "pruned" and changes_bias)) and \
                getattr(modules[layer.name], "bias", None) is not None:
            changed.append(f"{layer.name}.bias")
    return changed


class CheckpointTensors:
    """A checkpoint's tensors, read one at a time by name.

    Safetensors (single or sharded) with plain reads of that tensor alone; a PyTorch file
    memory-mapped where its format allows (the zip format of ``torch.save``; a legacy file
    loads whole).

    Parameters
    ----------
    checkpoint : (Path, module)
        As :func:`find_checkpoint` returns it.

    Attributes
    ----------
    shapes : dict of str to tuple
        Every tensor's shape, read without loading the tensors (from the headers).
    dtypes : dict of str to torch.dtype
        Every tensor's stored dtype (None for dtypes torch cannot read here).

    Examples
    --------
    ::

        tensors = CheckpointTensors(find_checkpoint("SmolLM2-135M"))
        tensors.shapes["model.layers.0.mlp.up_proj.weight"], tensors["model.norm.weight"].dtype
    """

    def __init__(self, checkpoint):
        import torch

        from .formats import safetensors_file, safetensors_sharded, torch_file

        path, fmt = checkpoint
        self.path, self.loaded, self.entries = path, None, {}
        if fmt is torch_file:
            self.loaded = dict(torch_file.flatten(torch_file.load(path)))
            self.shapes = {name: tuple(t.shape) for name, t in self.loaded.items()}
            self.dtypes = {name: t.dtype for name, t in self.loaded.items()}
            return
        if fmt is safetensors_sharded:
            headers = [header for header in safetensors_sharded.read_headers(path)[1].values()]
        else:
            headers = [(path, safetensors_file.read_header(path))]
        for shard, (tensors, _, data_start) in headers:
            for name, info in tensors.items():
                self.entries[name] = (shard, data_start, info)
        self.shapes = {name: tuple(info["shape"]) for name, (_, _, info) in self.entries.items()}
        self.dtypes = {name: getattr(torch, safetensors_file.TORCH_DTYPES.get(info["dtype"], ""), None)
                       for name, (_, _, info) in self.entries.items()}

    def __getitem__(self, name):
        from .formats.safetensors_file import read_entry

        if self.loaded is not None:
            return self.loaded[name]
        shard, data_start, info = self.entries[name]
        with open(shard, "rb") as raw:
            return read_entry(raw, data_start, info, shard)


class StreamedBlocks:
    """A model folder's model with one block's weights in memory at a time.

    The model is built from ``config.json`` with every parameter on the meta device (no
    memory; buffers such as rotary tables are computed as usual). The parameters outside
    the blocks that run before the first block (embeddings) are read now and freed once the
    first block's inputs are captured; the output embeddings are never read. A block's
    parameters are read (float32, on ``device``) by :meth:`load`, and by :meth:`unload` the
    ones pruning changed are written, in their stored dtype, to a safetensors file per
    block in ``spill`` (inside the output folder, removed by :meth:`close`) and the block
    goes back to the meta device. :attr:`written` then reads them back by checkpoint name.

    Parameters
    ----------
    transformers : module
        The ``transformers`` package.
    model_dir : Path
        The model folder.
    checkpoint : (Path, module)
        Its checkpoint, as :func:`find_checkpoint` returns it.
    device : torch.device
        Where the blocks are read to.
    spill : Path
        A folder to create for the changed tensors (inside the output folder).
    score : str
        The score pruning uses (AdaPrune changes biases too).

    Raises
    ------
    ValueError
        If the checkpoint's tensors do not match the model the config builds (the same
        message as loading the whole model).

    Examples
    --------
    ::

        loader = StreamedBlocks(transformers, folder, find_checkpoint(folder), torch.device("cpu"),
                                out / "spill", "wanda")
        prune(loader.model, windows, "2:4", score="wanda", block_loader=loader)
        write_checkpoint_folder(folder, find_checkpoint(folder), out, loader.written, {})
    """

    def __init__(self, transformers, model_dir, checkpoint, device, spill, score):
        import torch

        from .prune import find_blocks
        from .scores import SCORES

        self.device, self.spill, self.changes_bias = device, Path(spill), SCORES[score].CHANGES_BIAS
        self.reader = CheckpointTensors(checkpoint)
        config = transformers.AutoConfig.from_pretrained(model_dir)
        with _parameters_on_meta(), _errors_only(transformers):
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.eval()
        self.names = _parameter_names(self.model, self.reader.shapes, model_dir)
        blocks = tuple(f"{prefix}." for prefix, _ in find_blocks(self.model))
        head = self.model.get_output_embeddings()  # runs after the blocks: never needed
        head = next((f"{name}." for name, module in self.model.named_modules() if module is head), None)
        self.outside = [name for name, _ in self.model.named_parameters()
                        if not name.startswith(blocks) and not (head and name.startswith(head))]
        self._read(self.outside)
        for name, buffer in self.model.named_buffers():
            if not name.startswith(blocks):
                _set(self.model, name, buffer.to(device))
        self.spill.mkdir()
        self.written = _SpilledTensors()

    def load(self, prefix, block):
        """Read ``block``'s parameters (and the buffers the checkpoint holds) onto the device."""
        if self.outside:  # the first block's inputs are captured: the embeddings are no longer needed
            for name in self.outside:
                _set(self.model, name, self.model.get_parameter(name).to("meta"))
            self.outside = []
        self._read([f"{prefix}.{name}" for name, _ in block.named_parameters()])
        for name, buffer in block.named_buffers():
            stored = self.names.get(f"{prefix}.{name}")
            _set(block, name, (self.reader[stored] if stored else buffer).to(self.device))

    def unload(self, prefix, block, entries):
        """Write what pruning changed in ``block`` to the spill folder; free the block."""
        from safetensors.torch import save_file

        values = {}
        for name in changed_parameters(self.model, entries, self.changes_bias):  # each float32 one freed as it goes
            stored = self.names[name]
            values[stored] = self.model.get_parameter(name).detach().to(self.reader.dtypes[stored]).cpu().contiguous()
            _set(self.model, name, self.model.get_parameter(name).to("meta"))
        block.to("meta")
        if values:
            path = self.spill / f"{prefix}.safetensors"
            save_file(values, path)
            self.written.add(path, values)

    def close(self):
        """Remove the spill folder."""
        import shutil

        shutil.rmtree(self.spill, ignore_errors=True)

    def _read(self, names):
        import torch

        for name in names:
            stored = self.reader[self.names[name]]
            value = stored.to(self.device, torch.float32)
            # A float32 tensor of a memory-mapped .bin comes back as it is: pruning writes into
            # the weights in place, so never into the mapping.
            _set(self.model, name, value.clone() if value is stored else value)


def _set(module, name, value):
    """Replace the parameter or buffer ``name`` (dotted, below ``module``) by ``value``."""
    import torch

    owner, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner) if owner else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


class _SpilledTensors(Mapping):
    """Tensors written to safetensors files, by name, read back when asked for."""

    def __init__(self):
        self.files = {}

    def add(self, path, values):
        self.files.update({name: path for name in values})

    def __getitem__(self, name):
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self.files)

    def __len__(self):
        return len(self.files)


@contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device, their buffers as usual.

    Weights are then neither allocated nor initialized, while computed buffers (rotary
    tables, causal masks) hold their real values (accelerate's ``init_empty_weights`` does
    the same).

    Examples
    --------
    >>> import torch
    >>> with _parameters_on_meta():
    ...     layer = torch.nn.BatchNorm1d(4)
    >>> layer.weight.device.type, layer.running_var.device.type
    ('meta', 'cpu')
    """
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _parameter_names(model, shapes, model_dir):
    """``{model name: checkpoint name}`` for every parameter and every persistent buffer the
    checkpoint holds; a tied parameter is found through any of its names. Raises the message
    :func:`load_model` gives when the checkpoint does not fit the model."""
    prefix = getattr(model, "base_model_prefix", "")
    names, missing, mismatched, tied = {}, [], [], {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append((name, tuple(param.shape)))
    for group in tied.values():
        found = [(name, stored, shape) for name, shape in group
                 for stored in [_stored_name(name, shapes, prefix)] if stored is not None]
        if not found:
            missing.append(group[0][0])
            continue
        for name, stored, shape in found:
            if shapes[stored] != shape:
                mismatched.append(f"{stored} {list(shapes[stored])} where the model has {list(shape)}")
        for name, _ in group:
            names[name] = found[0][1]
    for name, _ in model.named_buffers():
        stored = _stored_name(name, shapes, prefix)
        if stored is not None:
            names[name] = stored
    if mismatched:
        raise ValueError(f"the weights in '{model_dir}' do not match its config.json: {mismatched[0]}")
    if missing:
        unexpected = sorted(set(shapes) - set(names.values()))
        raise ValueError(f"the weights in '{model_dir}' do not match its config.json (model_type "
                         f"{model.config.model_type!r}): {len(missing)} of the model's tensors are not in the checkpoint"
                         f" (e.g. {sorted(missing)[0]!r})"
                         + (f" and {len(unexpected)} of the checkpoint's are not in the model (e.g. {unexpected[0]!r})"
                            if unexpected else "")
                         + "; give the config.json saved with these weights")
    return names



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


def load_model(transformers, model_dir):
    """Load a model folder's causal language model whole, in float32.

    Weights that do not fit the folder's ``config.json`` are one line of error: transformers
    would log every missing tensor and hand back a randomly initialized model.

    Parameters
    ----------
    transformers : module
        The ``transformers`` package (:func:`require_transformers`).
    model_dir : str or Path
        The folder.

    Returns
    -------
    transformers.PreTrainedModel
        The model, in float32 on the CPU.

    Raises
    ------
    ValueError
        If the checkpoint's tensors do not match the config.

    Examples
    --------
    ::

        model = load_model(require_transformers(), "SmolLM2-135M")
    """
    import torch

    try:
        with _errors_only(transformers):
            model, loading = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                               output_loading_info=True)
    except RuntimeError as error:  # shapes that do not fit the config
        raise ValueError(f"the weights in '{model_dir}' do not match its config.json: "
                         f"{str(error).strip().splitlines()[-1].strip()}") from None
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


@contextmanager
def _errors_only(transformers):
    """transformers logs errors only (its advice while building a model is not the user's)."""
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def require_transformers():
    """Import ``transformers``, or say in one line how to install it.

    Returns
    -------
    module
        The ``transformers`` package.

    Raises
    ------
    ImportError
        If it is not installed, with the command that installs it.

    Examples
    --------
    >>> require_transformers().__name__
    'transformers'
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("transposable prune needs transformers: pip install 'transformers>=5.17' (or "
                          "pip install '.[llm]' in the transposable checkout)") from None
    return transformers


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
    names = set(fmt.names(path))
    prefix = getattr(model, "base_model_prefix", "")
    parameters = dict(model.named_parameters())
    values = {_checkpoint_name(name, names, prefix): parameters[name] for name in changed if name in parameters}
    write_checkpoint_folder(model_dir, checkpoint, folder, values, metadata, replaced)


def write_checkpoint_folder(model_dir, checkpoint, folder, values, metadata, replaced=(REPORT_NAME,)):
    """Write a model folder with some of its checkpoint's tensors replaced.

    The folder's other files are copied as they are (but ``replaced``); the checkpoint is
    rewritten in its format with ``values`` replacing tensors, each cast to its stored dtype,
    and every other tensor copied byte for byte.

    Parameters
    ----------
    model_dir : Path
        The source folder.
    checkpoint : (Path, module)
        Its checkpoint, as :func:`find_checkpoint` returns it.
    folder : Path
        The folder to fill.
    values : Mapping of str to Tensor
        ``{checkpoint name: new value}``, read one tensor at a time (it may load lazily).
    metadata : dict
        Added to the checkpoint's metadata.
    replaced : tuple of str
        File names not to copy (the caller writes its own).

    Raises
    ------
    ValueError
        If a name of ``values`` is not in the checkpoint.

    Examples
    --------
    ::

        write_checkpoint_folder(Path("SmolLM2-135M"), find_checkpoint("SmolLM2-135M"), Path("out"),
                                {"model.norm.weight": torch.ones(576)}, {"note": "norm reset"})
    """
    path, fmt = checkpoint
    inputs = set(fmt.files(path))
    for item in model_dir.iterdir():
        if item.is_file() and item not in inputs and item.name not in replaced:
            shutil.copyfile(item, folder / item.name)
    outputs = fmt.output_files(path, folder / path.name)
    converter = PrunedTensors(values)
    fmt.convert(path, folder / path.name, {Path(out): out for out in outputs}, converter, metadata)
    missing = sorted(set(values) - converter.written)
    if missing:
        raise ValueError(f"the checkpoint did not hold {len(missing)} changed tensor(s), e.g. {missing[0]!r}")


def _checkpoint_name(name, names, prefix):
    """The checkpoint's key for a model parameter (with or without the base model's prefix)."""
    stored = _stored_name(name, names, prefix)
    if stored is None:
        raise ValueError(f"the checkpoint has no tensor for the pruned parameter {name!r}")
    return stored


def _stored_name(name, names, prefix):
    """The key among ``names`` for a model's tensor ``name`` (with or without the base
    model's prefix), or None."""
    candidates = [name]
    if prefix:
        candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    return next((candidate for candidate in candidates if candidate in names), None)
