"""The ``transposable`` command.

Every failure is one line on stderr and a non-zero exit; outputs are checked before any
work and written atomically, so an error, Ctrl-C (exit 130) or SIGTERM (exit 143) leaves
no output behind. Modules are imported by the subcommand that needs them: ``--help`` and
``diversity`` never load torch or numba.
"""
import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, so temporary outputs are removed.

    Raised by the command's SIGTERM handler; :func:`main` turns it into exit status 143.

    Examples
    --------
    >>> issubclass(Terminated, Exception)  # not caught by ``except Exception``
    False
    """


def main(argv=None):
    """Run the ``transposable`` command; returns its exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 after an error (one line on stderr), 130 after Ctrl-C, 143 after
        SIGTERM. Usage errors and ``--help`` exit through ``SystemExit`` (2 and 0).

    Examples
    --------
    >>> main(["diversity", "--shape", "4x4", "--pattern", "2:4", "--transposable"])
    structure  transposable 2:4
    shape      4x4 (16 weights)
    log10 MD   1.9542
    exact      90
    paper      2.1584 (Hubara et al. 2021's closed-form approximation, not a count)
    0
    """
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    _log_to_stderr()
    command = "transposable"
    try:
        args = _build_parser().parse_args(argv)
        command = f"transposable {args.command}"
        args.run(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted; no output was written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{command}: terminated; no output was written", file=sys.stderr)
        return 143
    except (ValueError, TypeError, OSError) as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug or an unforeseen failure: still one line, traceback on request
        if os.environ.get("TRANSPOSABLE_TRACEBACK"):
            raise
        print(f"{command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              f"(set TRANSPOSABLE_TRACEBACK=1 to see where)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum, frame):
    raise Terminated


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def _one_line(exc):
    from .io import first_line

    return first_line(exc)


def _log_to_stderr():
    """Library warnings (e.g. "compiling solver kernels") as ``transposable: ...`` lines."""
    logger = logging.getLogger("transposable")
    if not any(getattr(h, "_transposable_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("transposable: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler._transposable_cli = True
        logger.addHandler(handler)


def _build_parser():
    from .diversity import STRUCTURES
    from .finetune import Recipe
    from .masks import METHODS
    from .scores import SCORES

    parser = _OneLineParser(
        prog="transposable",
        description="N:M and transposable N:M sparsity masks for weight tensors.")
    parser.add_argument("--version", action="version", version=f"transposable {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    solve = commands.add_parser(
        "solve", help="find the N:M or transposable N:M mask of one weight tensor",
        description="Find the best N:M mask (groups of M along the input dimension) or "
                    "transposable N:M mask (M x M tiles over (out, in)) of one weight tensor "
                    "and write it as a bool tensor.")
    solve.add_argument("file", help="weight file: .npy, .pt/.pth/.bin (a tensor or state dict), "
                                    ".safetensors or a *.safetensors.index.json")
    solve.add_argument("--key", help="tensor name inside the file (needed when it holds several)")
    _add_mask_options(solve, METHODS, pad_help="pad dimensions that are not a multiple of M with zeros, then crop")
    solve.add_argument("-o", "--output", required=True,
                       help="mask file: .npy, or the input's own format (.safetensors for a sharded input)")
    solve.add_argument("--force", action="store_true", help="replace an existing output file")
    solve.set_defaults(run=_solve)

    diversity = commands.add_parser(
        "diversity", help="count the masks a sparsity structure allows (mask diversity)",
        description="Mask diversity (Hubara et al. 2021): the number of masks a structure allows "
                    "over a tensor, as log10 (and the exact integer when it is short). "
                    "With --table, every structure at one density side by side, with Hubara et al.'s "
                    "closed-form approximation beside the exact transposable counts.")
    diversity.add_argument("--shape", required=True, type=_shape,
                           help="tensor shape, e.g. 768x3072 (out x in[ x kernel...]), or a weight count")
    diversity.add_argument("--pattern", help="N:M for row-wise or transposable masks, e.g. 4:8")
    diversity.add_argument("--transposable", action="store_true", help="transposable N:M (M x M tiles)")
    diversity.add_argument("--structure", choices=STRUCTURES,
                           help="default: transposable with --transposable, else rowwise")
    diversity.add_argument("--density", type=float, help="fraction kept, for unstructured, block and --table")
    diversity.add_argument("--block", type=int, help="block side b for b x b block sparsity")
    diversity.add_argument("--table", action="store_true",
                           help="compare every structure at --density (default 0.5)")
    diversity.set_defaults(run=_diversity)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint to N:M or transposable N:M",
        description="Write an N:M (or transposable N:M) copy of a checkpoint: PyTorch files "
                    "(.pt/.pth/.bin, read with weights_only=True), .safetensors, or sharded "
                    "safetensors (give the *.safetensors.index.json). Linear and conv weights are "
                    "masked (embeddings, norms and biases are not, by default); everything else is "
                    "copied byte for byte. Safetensors are streamed one tensor at a time.")
    convert.add_argument("input", help="checkpoint file, or a *.safetensors.index.json")
    convert.add_argument("-o", "--output", required=True,
                         help="output of the same kind (for sharded input: the new index path)")
    _add_mask_options(convert, METHODS, pad_help="pad weights that do not tile instead of leaving them dense")
    convert.add_argument("--include", action="append", default=[], metavar="GLOB",
                         help="convert only tensors whose names match (repeatable)")
    convert.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                         help="also leave these tensors alone (repeatable)")
    convert.add_argument("--in-out", action="append", default=None, metavar="GLOB", dest="in_out",
                         help="weights stored (in, out), as GPT-2's Conv1D (repeatable); default: GPT-2's when "
                              "the config.json beside the input says model_type gpt2")
    convert.add_argument("--report", metavar="FILE.json", help="also write the per-tensor report as JSON")
    convert.add_argument("--force", action="store_true", help="replace existing output files")
    convert.set_defaults(run=_convert)

    prune = commands.add_parser(
        "prune", help="prune a Hugging Face language model with calibration text (SparseGPT, Wanda)",
        description="Prune the linear layers of a Hugging Face causal language model folder to N:M or "
                    "transposable N:M, one block at a time, with importance scores from a little calibration "
                    "text (SparseGPT also reconstructs the kept weights), and write a new folder that "
                    "from_pretrained loads: the checkpoint with the pruned tensors replaced and every other "
                    "tensor and file as it was, plus pruning_report.json. Only one block's weights are in "
                    "memory at a time (read from the checkpoint when its turn comes), beside the calibration "
                    "activations. Needs transformers "
                    "(pip install transformers, or pip install '.[llm]' in the checkout).")
    prune.add_argument("model", help="model folder: config.json, tokenizer, *.safetensors or pytorch_model.bin")
    _add_mask_options(prune, METHODS, pad_help=None)
    prune.add_argument("--score", default="sparsegpt", help=f"one of {', '.join(SCORES)} (default sparsegpt)")
    for name, (score, option) in _score_options().items():
        prune.add_argument(f"--{name.replace('_', '-')}", type=type(option.default), metavar=name.upper(),
                           help=f"{score}: {option.help} (default {option.default})")
    prune.add_argument("--calibration", required=True, metavar="TEXT_FILE", help="UTF-8 text to calibrate on")
    prune.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    prune.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    prune.add_argument("--seed", type=int, default=0, help="seed of the windows' starts (default 0)")
    prune.add_argument("--permute", action="store_true",
                       help="permute each block's MLP hidden channels and attention value channels before masking, "
                            "so that the masks keep more (the model's outputs do not change)")
    prune.add_argument("--permute-seconds", type=float, default=1.0, metavar="S",
                       help="search budget per permuted dimension (default 1.0)")
    prune.add_argument("--refit", action="store_true",
                       help="prune the layers of a block one after another, each on the inputs the pruned ones give "
                            "it, fitted to the dense model's outputs (errors are corrected, not passed on)")
    prune.add_argument("--refit-dampening", type=float, metavar="D",
                       help="--refit: pull back to the dense weight, a fraction of the inputs' mean square "
                            "(default 1.0; smaller fits the calibration text more closely)")
    prune.add_argument("--device", metavar="DEVICE",
                       help="cpu, cuda or cuda:K: where blocks, activations and solvers run (default: cuda when "
                            "present, else cpu)")
    prune.add_argument("--offload-activations", metavar="DIR",
                       help="keep the calibration hidden states in a temporary file in DIR instead of memory: they "
                            "take samples x seqlen x hidden_size x 4 bytes (float32; twice that for adaprune and "
                            "--refit), e.g. 1 GiB for 128 x 512 tokens of a 4096-wide model")
    prune.add_argument("--in-memory", action="store_true",
                       help="load the whole model first (from_pretrained) instead of one block at a time; the same "
                            "results, more memory")
    prune.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="the new model folder")
    prune.add_argument("--force", action="store_true", help="replace an existing output folder")
    prune.set_defaults(run=_prune)

    finetune = commands.add_parser(
        "finetune", help="recover a pruned language model by sparse fine-tuning (distilling from the dense one)",
        description="Fine-tune a pruned Hugging Face causal language model folder under its N:M masks (read "
                    "from pruning_report.json, else from each layer's zeros) on the causal-LM loss of a text, "
                    "optionally distilling from the dense model, and write a new folder that from_pretrained "
                    "loads, every pruned layer still N:M, plus finetune_report.json. The end of the text is held "
                    "out for perplexity. Checkpoints go to OUT_DIR.checkpoints while it runs (--resume goes on "
                    "from the last one) and are removed when it completes.")
    finetune.add_argument("model", help="the pruned model folder")
    finetune.add_argument("--data", required=True, metavar="TEXT_FILE", help="UTF-8 text to train on")
    finetune.add_argument("--teacher", metavar="DENSE_DIR", help="the dense model to distill from")
    finetune.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="the new model folder")
    defaults = Recipe()
    for name, kind, text in (
            ("tokens", int, "training tokens in all"), ("seqlen", int, "tokens per window"),
            ("batch-size", int, "windows per micro-batch"), ("accumulation", int, "micro-batches per step"),
            ("lr", float, "peak learning rate (AdamW)"), ("weight-decay", float, "AdamW's weight decay"),
            ("warmup", float, "fraction of the steps warming up (then cosine decay)"),
            ("refresh-every", int, "steps between mask refreshes with --masks srste"),
            ("distill-weight", float, "weight of the logits' KL divergence (with --teacher)"),
            ("hidden-weight", float, "weight of the hidden-state loss (with --teacher)"),
            ("eval-fraction", float, "fraction of the text held out"),
            ("eval-every", int, "steps between held-out evaluations (0: start and end only)"),
            ("save-every", int, "steps between checkpoints (0: none)"), ("seed", int, "seed of the data order")):
        value = getattr(defaults, name.replace("-", "_"))
        finetune.add_argument(f"--{name}", type=kind, default=value, help=f"{text} (default {value})")
    finetune.add_argument("--masks", choices=("fixed", "srste"), default="fixed",
                          help="keep the pruned masks (default) or train with SR-STE and refresh them")
    finetune.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                          help="training precision of the weights (default float32)")
    finetune.add_argument("--autocast", action="store_true",
                          help="mixed precision: forward and backward in bfloat16, weights and optimizer in --dtype")
    finetune.add_argument("--backward-mask", action="store_true",
                          help="row-wise pruned models: a second, column-wise N:M mask for the input gradients "
                               "(Bi-Mask), so that both GEMMs can run on sparse tensor cores")
    finetune.add_argument("--resume", action="store_true", help="go on from the last checkpoint")
    finetune.add_argument("--allow-dense", action="store_true",
                          help="fine-tune a model with no N:M layer too (an experiment's dense control)")
    finetune.add_argument("--force", action="store_true", help="replace an existing output folder")
    finetune.set_defaults(run=_finetune)

    demo = commands.add_parser(
        "demo", help="train, prune and convert a small model on bundled data (offline)",
        description="Train an MLP on the bundled digits, prune it to 50% unstructured, save the "
                    "checkpoint, convert it to 2:4 transposable by magnitude and by AdaPrune, and "
                    "print the test accuracy of each.")
    demo.add_argument("--pattern", default="2:4", help="N:M to convert to (default 2:4)")
    demo.add_argument("--keep", metavar="DIR", help="keep the checkpoints in this existing directory")
    demo.set_defaults(run=_demo)

    train = commands.add_parser(
        "train", help="train N:M-sparse networks from scratch (--demo: on bundled data)",
        description="With --demo: train a small MLP on the bundled digits dense, and 2:4 / 4:8 sparse, "
                    "row-wise and transposable, with STE and SR-STE; print test accuracy and the final "
                    "SAD (mask entries flipped at the last refresh). Train your own models with "
                    "transposable.nn.sparsify and MaskRefresher.")
    train.add_argument("--demo", action="store_true", help="run the bundled demo (required)")
    train.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    train.set_defaults(run=_train)
    return parser


def _score_options():
    """Every score's own options, by name: ``{name: ("score, score", Option)}`` (the first
    score that declares a name gives its help and default)."""
    from .scores import SCORES

    found = {}
    for score, step in SCORES.items():
        for name, option in step.OPTIONS.items():
            scores, first = found.get(name, ((), option))
            found[name] = ((*scores, score), first)
    return {name: (", ".join(scores), option) for name, (scores, option) in found.items()}


def _add_mask_options(parser, methods, pad_help):
    """--pattern, --transposable, --method and --pad, as solve and convert share them."""
    parser.add_argument("--pattern", required=True, help="N:M, N kept of every M, e.g. 2:4")
    parser.add_argument("--transposable", action="store_true",
                        help="make every mask's transpose N:M too (M x M tiles)")
    parser.add_argument("--method", default="auto", choices=methods, type=str.lower,
                        help="transposable solver (default: auto, the fastest exact one)")
    if pad_help:
        parser.add_argument("--pad", action="store_true", help=pad_help)


def _solve(args):
    import time

    from .formats import format_of, mask_metadata, read_tensor, write_tensors
    from .io import check_outputs
    from .masks import kept_fraction, mask, resolve_method
    from .patterns import parse_pattern

    pattern = parse_pattern(args.pattern)
    method = resolve_method(args.method, pattern, transposable=args.transposable)
    source = format_of(args.file)
    target = format_of(args.output)
    allowed = {"npy", source.NAME if source.write_tensors else "safetensors"}
    if target.NAME not in allowed:
        raise ValueError(f"output '{args.output}' must be .npy or "
                         f"{source.DESCRIPTION if source.write_tensors else '.safetensors'}")
    check_outputs([args.output], inputs=source.files(args.file), force=args.force)
    weight, key = read_tensor(args.file, args.key)

    start = time.perf_counter()
    result = mask(weight, pattern, transposable=args.transposable, method=method, pad=args.pad)
    seconds = time.perf_counter() - start

    write_tensors(args.output, {key or "mask": result}, metadata=mask_metadata(pattern, args.transposable, method),
                  force=args.force)
    rows = [("file", args.file), ("key", key or "-"),
            ("shape", f"{tuple(weight.shape)} {str(weight.dtype).replace('torch.', '')}"),
            ("pattern", f"{pattern}{' transposable' if args.transposable else ' row-wise'}"),
            ("method", method), ("seconds", f"{seconds:.4f}"),
            ("kept L1", f"{kept_fraction(weight, result):.4f} of the weight's L1"),
            ("wrote", args.output)]
    for name, value in rows:
        print(f"{name:<8} {value}")


def _shape(text):
    try:
        dims = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 768x3072 or 1000000, got {text!r}") from None
    if min(dims) < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return dims[0] if len(dims) == 1 else dims


def _diversity(args):
    import math

    from .diversity import diversity_table, mask_diversity
    from .patterns import parse_pattern

    size = args.shape if isinstance(args.shape, int) else math.prod(args.shape)
    shown = args.shape if isinstance(args.shape, int) else "x".join(map(str, args.shape))
    if args.table:
        density = 0.5 if args.density is None else args.density
        rows = diversity_table(args.shape, density)
        unstructured = rows[0][1].log10
        print(f"mask diversity over {shown} ({size} weights) at density {density:g}")
        print(f"| {'structure':<44} | {'log10 MD':>16} | {'per weight':>10} | {'vs unstructured':>16} |")
        print(f"|{'-' * 46}|{'-' * 18}|{'-' * 12}|{'-' * 18}|")
        for label, md in rows:
            mark = " (estimate)" if md.source == "canfield-mckay" else ""
            print(f"| {label + mark:<44} | {md.log10:16.2f} | {md.log10 / size:10.5f} | "
                  f"{md.log10 - unstructured:16.2f} |")
        return
    structure = args.structure or ("transposable" if args.transposable else "rowwise")
    if args.transposable and structure != "transposable":
        raise ValueError(f"--transposable conflicts with --structure {structure}")
    md = mask_diversity(structure, args.shape, args.pattern, density=args.density, block=args.block)
    label = structure + (f" {parse_pattern(args.pattern)}" if args.pattern else "")
    print(f"structure  {label}")
    print(f"shape      {shown} ({size} weights)")
    print(f"log10 MD   {md.log10:.4f}{' (asymptotic estimate)' if md.estimated else ''}")
    if not md.estimated:
        digits = int(md.log10) + 1
        print(f"exact      {md.exact()}" if digits <= 60 else
              f"exact      {digits} digits (transposable.diversity.mask_diversity(...).exact())")
    if structure == "transposable":
        paper = mask_diversity(structure, args.shape, args.pattern, approximation="hubara2021")
        print(f"paper      {paper.log10:.4f} (Hubara et al. 2021's closed-form approximation, not a count)")


def _convert(args):
    from .convert import convert_checkpoint

    if args.report and Path(args.report).suffix.lower() != ".json":
        raise ValueError(f"--report '{args.report}' must end in .json")
    report = convert_checkpoint(args.input, args.output, args.pattern, transposable=args.transposable,
                                method=args.method, include=args.include, exclude=args.exclude,
                                in_out=args.in_out, pad=args.pad, force=args.force, progress=sys.stderr.isatty(),
                                report_file=args.report)
    print(f"| {'tensor':<40} | {'shape':<16} | {'density':>7} | {'kept L1':>7} | "
          f"{'nz kept':>7} | {'seconds':>7} | status")
    print(f"|{'-' * 42}|{'-' * 18}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 8}")
    for t in report.tensors:
        numbers = (f"{t.density:7.3f} | {t.kept_l1:7.4f} | {t.nonzeros_kept:7.4f} | {t.seconds:7.3f}"
                   if t.status == "converted" else f"{'-':>7} | {'-':>7} | {'-':>7} | {'-':>7}")
        status = f"{t.status} (stored in x out)" if t.in_out else t.status
        print(f"| {t.name:<40} | {'x'.join(map(str, t.shape)):<16} | {numbers} | {status}")
    summary = report.summary()
    kept = f"{summary['kept_l1']:.4f}" if summary["kept_l1"] is not None else "-"
    print(f"converted {summary['converted']} of {summary['tensors']} tensors ({summary['converted_weights']} "
          f"weights) to {report.pattern}{' transposable' if report.transposable else ''} with {report.method}; "
          f"{summary['left_dense']} left dense, {summary['skipped']} skipped; kept L1 {kept}; "
          f"{summary['seconds']:.2f} s solving")
    print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))


def _prune(args):
    from .pretrained import REPORT_NAME, prune_folder
    from .prune import PruneRecipe

    options = {name: getattr(args, name) for name in _score_options() if getattr(args, name) is not None}
    if args.refit_dampening is not None and not args.refit:
        raise ValueError(f"--refit-dampening {args.refit_dampening:g} does nothing without --refit; add --refit")
    refit_dampening = {} if args.refit_dampening is None else {"refit_dampening": args.refit_dampening}
    recipe = PruneRecipe(args.pattern, transposable=args.transposable, score=args.score, method=args.method,
                         options=options, permute=args.permute, permute_seconds=args.permute_seconds,
                         refit=args.refit, **refit_dampening)
    bar = sys.stderr.isatty()
    report = prune_folder(args.model, args.output, args.calibration, recipe, samples=args.samples,
                          seqlen=args.seqlen, seed=args.seed, device=args.device, stream=not args.in_memory,
                          offload_activations=args.offload_activations, force=args.force, progress=bar,
                          log_block=None if bar else _progress_line)
    kinds = {}
    for layer in report["layers"]:
        kinds.setdefault(layer["name"].rsplit(".", 1)[-1], []).append(layer)
    print(f"| {'layer':<12} | {'pruned':>6} | {'kept L1':>7} | {'error, mask only':>16} | {'error':>8} |")
    print(f"|{'-' * 14}|{'-' * 8}|{'-' * 9}|{'-' * 18}|{'-' * 10}|")
    for kind, layers in kinds.items():
        done = [layer for layer in layers if layer["status"] == "pruned"]
        if not done:
            print(f"| {kind:<12} | {0:>6} | {'-':>7} | {'-':>16} | {'-':>8} |  {layers[0]['status']}")
            continue
        mean = lambda key: sum(layer[key] for layer in done) / len(done)  # noqa: E731
        print(f"| {kind:<12} | {len(done):>6} | {mean('kept_l1'):7.4f} | {mean('error_masked'):16.4f} | "
              f"{mean('error'):8.4f} |")
    summary = report["summary"]
    print(f"pruned {summary['pruned']} layers ({summary['pruned_weights']} weights) to {report['pattern']}"
          f"{' transposable' if report['transposable'] else ''} by {report['score']} on {report['samples']} x "
          f"{report['seqlen']} calibration tokens; {summary['left_dense']} left dense; mean relative output "
          f"error {summary['mean_error']:.4f} ({summary['mean_error_masked']:.4f} with the masks alone)")
    gains = [layer["permutation_gain"] for layer in report["layers"] if layer["permutation_gain"] is not None]
    if gains:
        print(f"permuted {sum(bool(layer['permutation']) for layer in report['layers'])} layers: their masks keep "
              f"{100 * sum(gains) / len(gains):+.2f} % more score on average")
    print(f"wrote {args.output} (report: {REPORT_NAME})")


def _finetune(args):
    from .finetune import FINETUNE_REPORT, Recipe, finetune

    names = [n for n in Recipe.__dataclass_fields__]
    recipe = Recipe(**{name: getattr(args, name) for name in names})
    bar = sys.stderr.isatty()
    report = finetune(args.model, args.output, args.data, teacher=args.teacher, recipe=recipe, resume=args.resume,
                      force=args.force, allow_dense=args.allow_dense, progress=bar, log=_progress_line)
    print(f"fine-tuned {len(report['layers'])} N:M layers on {report['tokens']} tokens ({report['steps']} steps, "
          f"{report['seconds']:.0f} s): held-out perplexity {report['perplexity_before']:.3f} -> "
          f"{report['perplexity_after']:.3f}")
    print(f"wrote {args.output} (report: {FINETUNE_REPORT})")


def _demo(args):
    from .demo import run_demo

    if args.keep and not Path(args.keep).is_dir():
        raise FileNotFoundError(f"--keep directory '{args.keep}' does not exist")
    rows = run_demo(workdir=args.keep, pattern=args.pattern, log=_progress_line)
    print(f"\n| {'model':<44} | {'Linear weights non-zero':>23} | {'test accuracy':>13} |")
    print(f"|{'-' * 46}|{'-' * 25}|{'-' * 15}|")
    for label, kept, accuracy in rows:
        print(f"| {label:<44} | {kept:23.3f} | {accuracy:13.4f} |")


def _train(args):
    from .demo import run_training_demo

    if not args.demo:
        raise ValueError("only --demo is available from the command line; train your own model with "
                         "transposable.nn.sparsify and MaskRefresher (see the README)")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    bar = sys.stderr.isatty()  # a progress bar on a terminal, else one line per finished run
    rows = run_training_demo(epochs=args.epochs, progress=bar, log=(lambda *a: None) if bar else _progress_line)
    print(f"| {'model':<26} | {'test accuracy':>13} | {'final SAD':>10} |")
    print(f"|{'-' * 28}|{'-' * 15}|{'-' * 12}|")
    for label, accuracy, sad in rows:
        print(f"| {label:<26} | {accuracy:13.4f} | {'-' if sad is None else f'{sad:.5f}':>10} |")


def _progress_line(text):
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
