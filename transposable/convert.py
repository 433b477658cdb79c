"""Convert trained checkpoints to N:M or transposable N:M, streaming and safely.

Formats: every format in :mod:`transposable.formats` that holds checkpoints: PyTorch files
(``.pt``, ``.pth``, ``.bin``; read with ``weights_only=True``), single safetensors files,
and sharded safetensors (``*.safetensors.index.json`` with its shards). The output keeps
the input's format, sharding, tensor names, dtypes and metadata; tensors that are not
converted are copied byte for byte. Safetensors are streamed: one tensor at a time is read,
masked and written, so memory stays near the largest tensor.
"""
import fnmatch
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .formats import format_of, mask_metadata
from .io import atomic_outputs, check_outputs
from .layout import TilingError
from .masks import kept_fraction, mask, resolve_method
from .patterns import parse_pattern

#: Tensors never converted unless ``include`` names them: embeddings, norms, biases.
DEFAULT_EXCLUDE = ("*embed*", "*wte*", "*wpe*", "*norm*", "*ln_*", "*.ln*", "*bias")

#: Model types (``config.json``'s ``model_type``) whose linear layers are GPT-2 style
#: ``Conv1D``, storing weights ``(in, out)``, and the names of those weights.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt")
CONV1D_WEIGHTS = ("*attn.c_attn.weight", "*attn.c_proj.weight", "*mlp.c_fc.weight", "*mlp.c_proj.weight")


@dataclass
class TensorReport:
    """What happened to one tensor of a conversion.

    Parameters
    ----------
    name : str
        The tensor's name in the checkpoint.
    shape : list of int
        Its shape.
    dtype : str
        Its dtype (``"float32"``, ``"bf16"``...).
    status : str
        ``"converted"``, ``"skipped: <why>"`` or ``"left dense: <why>"``.
    density : float, optional
        Fraction of non-zeros before conversion (converted tensors).
    kept_l1 : float, optional
        Kept ``|w|`` over total ``|w|``.
    nonzeros_kept : float, optional
        Fraction of the original non-zeros that the mask keeps.
    seconds : float, optional
        Time spent solving the mask.
    in_out : bool, optional
        Whether the weight is stored ``(in, out)`` (GPT-2 ``Conv1D``): its mask was solved
        on the transpose, groups along the input features.

    Examples
    --------
    >>> TensorReport("fc.bias", [8], "float32", "skipped: 1-D").status
    'skipped: 1-D'
    """

    name: str
    shape: list
    dtype: str
    status: str  # "converted", "skipped: ...", or "left dense: ..."
    density: float = None  # non-zero fraction before
    kept_l1: float = None  # kept |w| / total |w|
    nonzeros_kept: float = None  # fraction of the original non-zeros still kept
    seconds: float = None
    in_out: bool = False  # stored (in, out): the mask was solved on the transpose


@dataclass
class ConversionReport:
    """Per-tensor results and a summary of one conversion (see :func:`convert_checkpoint`).

    Parameters
    ----------
    input, output : str
        The checkpoint read and the one written.
    pattern : str
        ``"2:4"`` etc.
    transposable : bool
        Whether masks are transposable.
    method : str
        The resolved solver (``"rowwise"`` for row-wise masks).
    version : str, optional
        The library's version.
    tensors : list of TensorReport, optional
        One entry per tensor, in file order.

    Examples
    --------
    >>> report = ConversionReport("a.pt", "b.pt", "2:4", False, "rowwise")
    >>> report.summary()["converted"], report.version == __version__
    (0, True)
    """

    input: str
    output: str
    pattern: str
    transposable: bool
    method: str
    version: str = __version__
    tensors: list = field(default_factory=list)

    def summary(self):
        """Counts, converted weights, their weighted kept L1 and solving seconds (a dict)."""
        converted = [t for t in self.tensors if t.status == "converted"]
        weights = sum(math.prod(t.shape) for t in converted)
        return {
            "tensors": len(self.tensors),
            "converted": len(converted),
            "left_dense": sum(t.status.startswith("left dense") for t in self.tensors),
            "skipped": sum(t.status.startswith("skipped") for t in self.tensors),
            "converted_weights": weights,
            "kept_l1": (sum(t.kept_l1 * math.prod(t.shape) for t in converted) / weights) if weights else None,
            "seconds": sum(t.seconds for t in converted),
        }

    def to_json(self):
        """The report and its summary as indented JSON text."""
        return json.dumps({**asdict(self), "summary": self.summary()}, indent=2)


def convert_checkpoint(source, output, pattern, *, transposable=False, method="auto", include=(),
                       exclude=(), in_out=None, pad=False, force=False, progress=False, report_file=None):
    """Write an N:M (or transposable N:M) copy of a checkpoint.

    Parameters
    ----------
    source : str or Path
        A ``.pt``/``.pth``/``.bin`` file, a ``.safetensors`` file, or a sharded
        checkpoint's ``*.safetensors.index.json`` (its shards beside it).
    output : str or Path
        Where to write, in the same format: a file of the same kind, or for a sharded
        checkpoint the new index path (shards are written beside it, same file names).
    pattern : str or tuple
        ``"2:4"`` etc.: N kept of every M along each weight's input dimension.
    transposable : bool, default False
        Make every mask transposable too (M x M tiles over ``(out, in)``). Off by default
        because a converted checkpoint usually serves inference, which needs only the
        row-wise pattern; training's backward pass needs the transposable one.
    method : str, default "auto"
        Transposable solver, as in :func:`transposable.mask`.
    include, exclude : sequence of str
        Glob patterns on tensor names. By default every floating tensor with at least 2
        dimensions is converted except names matching ``DEFAULT_EXCLUDE`` (embeddings,
        norms, biases); ``include`` limits conversion to matching names, ``exclude`` adds
        to the exclusions.
    in_out : sequence of str, optional
        Glob patterns naming weights stored ``(in, out)`` (GPT-2 style ``Conv1D``); their
        masks are solved on the transpose, so groups run along the input features. Default:
        ``CONV1D_WEIGHTS`` when the ``config.json`` beside ``source`` says the model type is
        one of ``CONV1D_MODEL_TYPES``, else none (every weight is ``(out, in)``).
    pad : bool, default False
        Pad weights whose dimensions are not multiples of M; otherwise they are reported and
        left dense.
    force : bool, default False
        Replace existing output files. The input is never overwritten.
    progress : bool, default False
        Show a progress bar over tensors (stderr).
    report_file : str or Path, optional
        Also write the report as JSON there, in the same all-or-nothing write.

    Returns
    -------
    ConversionReport
        What happened to every tensor, and a summary.

    Raises
    ------
    FileExistsError
        If an output exists and ``force`` is False (checked before any work).
    FileNotFoundError, PermissionError
        If an input is missing, or an output directory is missing or not writable.
    ValueError
        For a bad pattern or method, an output of another format or equal to the input, a
        corrupt or truncated file, a missing shard, or a tensor name found twice.

    Notes
    -----
    Masks follow the library's axis convention (groups along ``in``, tiles over ``(out,
    in)`` per kernel tap). Pruned weights become exact zeros in the tensor's own dtype.
    Outputs are written to temporary files beside their destination and renamed only when
    everything is written, so an error, Ctrl-C or full disk leaves no partial output.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> torch.save({"fc.weight": torch.randn(8, 8), "fc.bias": torch.zeros(8)}, os.path.join(folder, "m.pt"))
    >>> report = convert_checkpoint(os.path.join(folder, "m.pt"), os.path.join(folder, "m24.pt"), "2:4")
    >>> [t.status for t in report.tensors]
    ['converted', 'skipped: 1-D']
    """
    pattern = parse_pattern(pattern)
    method = resolve_method(method, pattern, transposable=transposable)
    source, output = Path(source), Path(output)
    fmt = format_of(source)
    if fmt.convert is None:
        raise ValueError(f"'{source}' is a {fmt.DESCRIPTION} array, not a checkpoint; convert takes "
                         f".pt/.pth/.bin, .safetensors or a *.safetensors.index.json "
                         f"(transposable solve masks one array)")
    if format_of(output) is not fmt:
        raise ValueError(f"output '{output}' must be of the input's kind ({fmt.DESCRIPTION})")
    outputs = fmt.output_files(source, output) + ([Path(report_file)] if report_file else [])
    check_outputs(outputs, inputs=fmt.files(source), force=force)  # before any work
    report = ConversionReport(str(source), str(output), str(pattern), transposable, method)
    in_out = conv1d_weights(source) if in_out is None else tuple(in_out)
    converter = Converter(pattern, transposable, method, pad, tuple(include), DEFAULT_EXCLUDE + tuple(exclude),
                          report, progress, in_out)
    with atomic_outputs(outputs, force=force) as temporaries:
        try:
            fmt.convert(source, output, temporaries, converter, mask_metadata(pattern, transposable, method))
        finally:
            converter.close()
        if report_file:
            Path(temporaries[Path(report_file)]).write_text(report.to_json())
    return report


class Converter:
    """Chooses, masks and reports tensor by tensor; the format modules call it.

    ``begin(total)`` once, then per tensor ``wants(name, shape, dtype, is_float)``: True
    to have it converted by ``converter(name, tensor)``, False (reported as skipped) to
    have it copied as it is.

    Parameters
    ----------
    pattern : Pattern
        The N:M pattern.
    transposable : bool
        Transposable masks.
    method : str
        The resolved solver.
    pad : bool
        Pad weights that do not tile (else they are left dense and reported).
    include, exclude : tuple of str
        Glob rules, as in :func:`select`.
    report : ConversionReport
        Where entries are appended.
    progress : bool
        Show a progress bar.
    in_out : tuple of str, optional
        Globs of weights stored ``(in, out)``, masked through their transpose.

    Examples
    --------
    >>> import torch
    >>> from transposable.patterns import parse_pattern
    >>> report = ConversionReport("in", "out", "2:4", False, "rowwise")
    >>> converter = Converter(parse_pattern("2:4"), False, "rowwise", False, (), DEFAULT_EXCLUDE, report, False)
    >>> converter.begin(2)
    >>> converter.wants("fc.bias", (4,), "float32", True)
    False
    >>> converter("fc.weight", torch.tensor([[1.0, 2, 3, 4]])).tolist()
    [[0.0, 0.0, 3.0, 4.0]]
    >>> converter.close(); [t.status for t in report.tensors]
    ['skipped: 1-D', 'converted']
    """

    def __init__(self, pattern, transposable, method, pad, include, exclude, report, progress, in_out=()):
        self.pattern, self.transposable, self.method, self.pad = pattern, transposable, method, pad
        self.include, self.exclude, self.report, self.progress = include, exclude, report, progress
        self.in_out = in_out
        self.bar = None

    def begin(self, total):
        """Start the progress bar over ``total`` tensors (if ``progress``)."""
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tensor", leave=False)

    def close(self):
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()

    def _done(self):
        if self.bar is not None:
            self.bar.update()

    def wants(self, name, shape, dtype, is_float):
        """Whether to convert this tensor; if not, it is reported as skipped."""
        reason = select(name, shape, is_float, self.include, self.exclude)
        if reason is not None:
            self.report.tensors.append(TensorReport(name, list(shape), dtype, f"skipped: {reason}"))
            self._done()
        return reason is None

    def __call__(self, name, tensor):
        import torch

        shape, dtype = list(tensor.shape), str(tensor.dtype).replace("torch.", "")
        in_out = tensor.dim() == 2 and any(fnmatch.fnmatchcase(name, glob) for glob in self.in_out)
        start = time.perf_counter()
        try:
            kept = mask(tensor.t() if in_out else tensor, self.pattern, transposable=self.transposable,
                        method=self.method, pad=self.pad)
            kept = kept.t() if in_out else kept
        except TilingError as exc:
            self.report.tensors.append(TensorReport(name, shape, dtype, f"left dense: {exc.reason}"))
            self._done()
            return tensor
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from exc
        seconds = time.perf_counter() - start
        nonzero = tensor != 0
        nonzeros = int(nonzero.sum())
        self.report.tensors.append(TensorReport(
            name, shape, dtype, "converted", density=nonzeros / tensor.numel(),
            kept_l1=kept_fraction(tensor, kept),
            nonzeros_kept=int((nonzero & kept).sum()) / nonzeros if nonzeros else 1.0, seconds=seconds,
            in_out=in_out))
        self._done()
        return torch.where(kept, tensor, torch.zeros((), dtype=tensor.dtype))  # +0.0, never -0.0


def conv1d_weights(source):
    """The weights stored ``(in, out)`` in a checkpoint, by its folder's ``config.json``.

    The model type recorded there decides (see ``CONV1D_MODEL_TYPES``).

    Parameters
    ----------
    source : str or Path
        A checkpoint file.

    Returns
    -------
    tuple of str
        ``CONV1D_WEIGHTS`` for a model type in ``CONV1D_MODEL_TYPES`` (GPT-2), else ``()``.

    Examples
    --------
    >>> conv1d_weights("/nowhere/model.safetensors")
    ()
    """
    config = Path(source).parent / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return ()
    return CONV1D_WEIGHTS if model_type in CONV1D_MODEL_TYPES else ()


def select(name, shape, is_float, include, exclude):
    """Why a tensor is not to be converted, or None if it is.

    A name matched by ``include`` is exempt from the default exclusions (not from the
    caller's).

    Parameters
    ----------
    name : str
        The tensor's name.
    shape : sequence of int
        Its shape (fewer than 2 dimensions or no elements: not converted).
    is_float : bool
        Whether its dtype is floating point.
    include : sequence of str
        If given, only names matching one of these globs are converted.
    exclude : sequence of str
        Names matching one of these globs are not converted.

    Returns
    -------
    str or None
        The reason, e.g. ``"excluded by *norm*"``, or None.

    Examples
    --------
    >>> select("layers.0.norm.weight", (64, 64), True, (), DEFAULT_EXCLUDE)
    'excluded by *norm*'
    >>> select("layers.0.mlp.weight", (64, 64), True, (), DEFAULT_EXCLUDE) is None
    True
    """
    included = any(fnmatch.fnmatchcase(name, glob) for glob in include)
    if include and not included:
        return "not included"
    if not is_float:
        return "not floating point"
    if len(shape) < 2:
        return f"{len(shape)}-D"
    if math.prod(shape) == 0:
        return "empty"
    for glob in exclude:
        if fnmatch.fnmatchcase(name, glob) and not (included and glob in DEFAULT_EXCLUDE):
            return f"excluded by {glob}"
    return None
