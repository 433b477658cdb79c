"""The ``transposable`` command."""
import argparse
import math
import sys
import time
from pathlib import Path

import solvers

from . import __version__
from .convert import convert_checkpoint
from .diversity import STRUCTURES, diversity_table, mask_diversity
from .io import file_format, load_tensor, save_tensors
from .masks import METHODS, kept_fraction, nm_mask, resolve_method, transposable_mask
from .patterns import parse_pattern


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("transposable: interrupted; no output was written", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, solvers.MinCostFlowError) as exc:
        print(f"transposable {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _build_parser():
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
    solve.add_argument("file", help="weight file: .npy, .pt/.pth/.bin (a tensor or state dict) "
                                    "or .safetensors")
    solve.add_argument("--key", help="tensor name inside a .pt or .safetensors file "
                                     "(needed when it holds several)")
    _add_mask_options(solve, pad_help="pad dimensions that are not a multiple of M with zeros, then crop")
    solve.add_argument("-o", "--output", required=True,
                       help="mask file: .npy, or the input's own format")
    solve.add_argument("--force", action="store_true", help="replace an existing output file")
    solve.set_defaults(run=_solve)

    diversity = commands.add_parser(
        "diversity", help="count the masks a sparsity structure allows (mask diversity)",
        description="Mask diversity (Hubara et al. 2021): the number of masks a structure allows "
                    "over a tensor, as log10 (and the exact integer when it is short). "
                    "With --table, every structure at one density side by side.")
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
    _add_mask_options(convert, pad_help="pad weights that do not tile instead of leaving them dense")
    convert.add_argument("--include", action="append", default=[], metavar="GLOB",
                         help="convert only tensors whose names match (repeatable)")
    convert.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                         help="also leave these tensors alone (repeatable)")
    convert.add_argument("--report", metavar="FILE", help="also write the per-tensor report as JSON")
    convert.add_argument("--force", action="store_true", help="replace existing output files")
    convert.set_defaults(run=_convert)

    demo = commands.add_parser(
        "demo", help="train, prune and convert a small model on bundled data (offline)",
        description="Train an MLP on the bundled digits, prune it to 50%% unstructured, save the "
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


def _add_mask_options(parser, pad_help):
    """--pattern, --transposable, --method and --pad, as solve and convert share them."""
    parser.add_argument("--pattern", required=True, help="N:M, N kept of every M, e.g. 2:4")
    parser.add_argument("--transposable", action="store_true",
                        help="make every mask's transpose N:M too (M x M tiles)")
    parser.add_argument("--method", default=None, choices=METHODS, type=str.lower,
                        help="transposable solver (default: auto, the fastest exact one)")
    parser.add_argument("--pad", action="store_true", help=pad_help)


def _method(args):
    """The --method asked for ("auto" if none); only meaningful with --transposable."""
    if args.method is not None and not args.transposable:
        raise ValueError("--method chooses the transposable solver; add --transposable or drop --method")
    return args.method or "auto"


def _solve(args):
    pattern = parse_pattern(args.pattern)
    method = _method(args)
    method = resolve_method(method, pattern) if args.transposable else "rowwise"
    _check_output(args.file, args.output)
    weight, key = load_tensor(args.file, args.key)

    start = time.perf_counter()
    if args.transposable:
        mask = transposable_mask(weight, pattern, method=method, pad=args.pad)
    else:
        mask = nm_mask(weight, pattern, pad=args.pad)
    seconds = time.perf_counter() - start

    metadata = {"pattern": str(pattern), "transposable": str(args.transposable).lower(),
                "method": method, "transposable_version": __version__}
    save_tensors(args.output, {key or "mask": mask}, metadata=metadata, force=args.force)
    rows = [("file", args.file), ("key", key or "-"),
            ("shape", f"{tuple(weight.shape)} {str(weight.dtype).replace('torch.', '')}"),
            ("pattern", f"{pattern}{' transposable' if args.transposable else ' row-wise'}"),
            ("method", method), ("seconds", f"{seconds:.4f}"),
            ("kept L1", f"{kept_fraction(weight, mask):.4f} of the weight's L1"),
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
    size = args.shape if isinstance(args.shape, int) else math.prod(args.shape)
    shown = args.shape if isinstance(args.shape, int) else "x".join(map(str, args.shape))
    if args.table:
        density = 0.5 if args.density is None else args.density
        rows = diversity_table(args.shape, density)
        unstructured = rows[0][1].log10
        print(f"mask diversity over {shown} ({size} weights) at density {density:g}")
        print(f"| {'structure':<30} | {'log10 MD':>16} | {'per weight':>10} | {'vs unstructured':>16} |")
        print(f"|{'-' * 32}|{'-' * 18}|{'-' * 12}|{'-' * 18}|")
        for label, md in rows:
            mark = " (estimate)" if md.estimated else ""
            print(f"| {label + mark:<30} | {md.log10:16.2f} | {md.log10 / size:10.5f} | "
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


def _convert(args):
    method = _method(args)
    if args.report:
        _check_output(args.input, args.report, allowed=(".json",))
    report = convert_checkpoint(args.input, args.output, args.pattern, transposable=args.transposable,
                                method=method, include=args.include, exclude=args.exclude,
                                pad=args.pad, force=args.force, progress=sys.stderr.isatty())
    print(f"| {'tensor':<40} | {'shape':<16} | {'density':>7} | {'kept L1':>7} | "
          f"{'nz kept':>7} | {'seconds':>7} | status")
    print(f"|{'-' * 42}|{'-' * 18}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 8}")
    for t in report.tensors:
        numbers = (f"{t.density:7.3f} | {t.kept_l1:7.4f} | {t.nonzeros_kept:7.4f} | {t.seconds:7.3f}"
                   if t.status == "converted" else f"{'-':>7} | {'-':>7} | {'-':>7} | {'-':>7}")
        print(f"| {t.name:<40} | {'x'.join(map(str, t.shape)):<16} | {numbers} | {t.status}")
    summary = report.summary()
    kept = f"{summary['kept_l1']:.4f}" if summary["kept_l1"] is not None else "-"
    print(f"converted {summary['converted']} of {summary['tensors']} tensors ({summary['converted_weights']} "
          f"weights) to {report.pattern}{' transposable' if report.transposable else ''} with {report.method}; "
          f"{summary['left_dense']} left dense, {summary['skipped']} skipped; kept L1 {kept}; "
          f"{summary['seconds']:.2f} s solving")
    print(f"wrote {args.output}")
    if args.report:
        from .io import atomic_output

        with atomic_output(args.report, force=args.force) as tmp:
            Path(tmp).write_text(report.to_json())
        print(f"wrote {args.report}")


def _demo(args):
    from .demo import run_demo

    if args.keep and not Path(args.keep).is_dir():
        raise FileNotFoundError(f"--keep directory '{args.keep}' does not exist")
    rows = run_demo(workdir=args.keep, pattern=args.pattern)
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
    rows = run_training_demo(epochs=args.epochs, progress=sys.stderr.isatty(), log=lambda *a: None)
    print(f"| {'model':<26} | {'test accuracy':>13} | {'final SAD':>10} |")
    print(f"|{'-' * 28}|{'-' * 15}|{'-' * 12}|")
    for label, accuracy, sad in rows:
        print(f"| {label:<26} | {accuracy:13.4f} | {'-' if sad is None else f'{sad:.5f}':>10} |")


def _check_output(source, output, allowed=None):
    """Refuse outputs that would replace the input or change its format."""
    if Path(output).resolve() == Path(source).resolve():
        raise ValueError(f"output '{output}' is the input file; the input is never overwritten")
    if allowed is not None:
        if Path(output).suffix.lower() not in allowed:
            raise ValueError(f"'{output}' must end in {' or '.join(allowed)}")
        return
    if file_format(output) not in ("npy", file_format(source)):
        raise ValueError(f"output '{output}' must be .npy or the input's format "
                         f"({Path(source).suffix})")


if __name__ == "__main__":
    sys.exit(main())
