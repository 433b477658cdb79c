"""Prune, then recover: what transposable N:M costs a real language model after fine-tuning.

SmolLM2-135M-Instruct (``examples/smollm2_folder.py``) is pruned one-shot with SparseGPT
(``transposable prune``, 32 windows of 512 tokens of the first 200 Lee news articles) to
row-wise 2:4 and transposable 2:4, 4:8 and 8:16, then fine-tuned (``transposable finetune``)
on all 300 articles with the same token budget for every row; the last 15 % of the text is
held out. Per row: held-out perplexity before (one-shot) and after fine-tuning, as the
command reports it, and perplexity on text from another domain (the Python documentation's
topics shipped with CPython, ``pydoc_data.topics``), measured here on the same windows for
every folder. Rows: dense, dense fine-tuned (the control: what the text alone does), and per
pattern fine-tuning with and without distillation from the dense model, with fixed masks,
for transposable 2:4 also with SR-STE refreshes, started from the dense weights under the
pruned masks, and for row-wise 2:4 also with a backward mask (``--backward-mask``: the input
gradients through a column-wise 2:4 mask, so that both GEMMs could run on sparse tensor cores
without transposable masks). ``--score`` chooses how the models are pruned, ``--recoveries``
which rows run (``bimask`` only where the pattern is row-wise); ``hidden`` adds the
hidden-state loss to the distillation. ``--wikipedia`` trains on Wikipedia prose as well
(gensim's test dump of 200-odd articles, 549k SmolLM2 tokens, put before the news), so that
longer recoveries do not go round the 64k training tokens of news many times; the held-out
news windows stay the same.

With ``--overhead``: instead, the cost of the masks in a fine-tuning step. The dense model
(``--allow-dense``) and the transposable 2:4 one (fixed masks, no teacher) fine-tune for the
same few steps, each in a fresh process that reports its peak resident memory; printed: the
median step time and the peak, and their ratios sparse / dense.

Setup: as ``examples/smollm2_folder.py`` says, plus ``pip install --no-deps gensim`` (the text).
Run: python benchmarks/bench_finetune.py [--steps 20] [--workdir DIR] [--json FILE] [--overhead]
     python benchmarks/bench_finetune.py --score alps --patterns 2:4 T2:4 --recoveries distilled srste --lr 3e-4
     python benchmarks/bench_finetune.py --score alps --patterns 2:4 T2:4 --recoveries distilled --steps 80 --autocast
     python benchmarks/bench_finetune.py --score alps --patterns 2:4 T2:4 --recoveries distilled bimask --autocast
     python benchmarks/bench_finetune.py --score alps --refit --patterns 2:4 T2:4 --recoveries distilled
         --steps 640 --autocast --wikipedia
"""
import argparse
import bz2
import functools
import html
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import package_folder, prepare  # noqa: E402  (the model folder and the news text)

SEQLEN, BATCH = 256, 4
HELD_OUT = 0.15  # of the news text: the end of its last articles
WIKIPEDIA_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
PATTERNS = [("2:4", False), ("2:4", True), ("4:8", True), ("8:16", True)]

#: Recoveries by name: (label, extra options, with the dense model as teacher). SR-STE with a
#: teacher starts from the dense weights under the pruned masks, so that refreshes can regrow.
RECOVERIES = {"plain": ("plain, fixed masks", [], False),
              "distilled": ("distilled, fixed masks", [], True),
              # weight 30: the hidden-state loss is a mean over SmolLM2's 30 layers; SquareHead sums them
              "hidden": ("distilled with hidden states (weight 30), fixed masks", ["--hidden-weight", 30], True),
              "srste": ("distilled, SR-STE from dense (refresh every 5 steps)", ["--masks", "srste",
                                                                                 "--refresh-every", 5], True),
              # row-wise patterns only: both GEMMs sparse without transposable masks
              "bimask": ("distilled, fixed masks, backward mask (Bi-Mask)", ["--backward-mask"], True)}


def command(*argv):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "transposable", *map(str, argv)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"transposable {argv[0]} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


# The command in a fresh process, reporting its own peak resident memory (VmHWM).
WITH_PEAK = """
import sys
from transposable.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    print("PEAK_RSS_BYTES", next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024)
sys.exit(code)
"""


def overhead(work, dense, pruned, common):
    """Median step time and peak memory of fine-tuning, dense against transposable 2:4."""
    print("| model | median step (s) | peak RSS (MiB) |")
    print("|---|---|---|", flush=True)
    measured = {}
    for label, folder, extra in (("dense", dense, ["--allow-dense"]), ("2:4 transposable", pruned, [])):
        out = work / f"overhead-{label.split()[0]}"
        result = subprocess.run([sys.executable, "-c", WITH_PEAK, "finetune", *map(str, [folder, *common, *extra]),
                                 "-o", str(out), "--force"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        peak = int(result.stdout.split("PEAK_RSS_BYTES")[1].split()[0])
        step = json.loads((out / "finetune_report.json").read_text())["step_seconds"]
        measured[label] = (step, peak)
        print(f"| {label} | {step:.2f} | {peak / 2**20:.0f} |", flush=True)
    (d_step, d_peak), (s_step, s_peak) = measured.values()
    print(f"sparse / dense: step {s_step / d_step:.2f}x, peak memory {s_peak / d_peak:.2f}x")
    return measured


def wikipedia_text():
    """Prose of the 200-odd Wikipedia articles in gensim's test dump (549k SmolLM2
    tokens): markup, references, templates, tables, lists and links' targets removed."""
    dump = package_folder("gensim") / "test" / "test_data" / WIKIPEDIA_DUMP
    xml = bz2.decompress(dump.read_bytes()).decode()
    articles = []
    for page in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        text = html.unescape(page)
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = re.sub(r"<!--.*?-->|<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
        count = 1
        while count:  # templates and tables nest: innermost first, until none is left
            text, count = re.subn(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", "", text)
        text = re.sub(r"\[\[(?:File|Image|Category):(?:[^\[\]]|\[\[[^\]]*\]\])*\]\]", "", text, flags=re.I)
        text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)  # [[target|shown]] -> shown
        text = re.sub(r"\[https?://\S+ ([^\]]*)\]|\[https?://\S+\]", r"\1", text)
        text = re.sub(r"<[^>]+>|'''?", "", text)
        # prose only: no headings, lists, table leftovers or short lines
        lines = [line.strip() for line in text.splitlines()]
        articles.append("\n".join(line for line in lines if len(line.split()) >= 8
                                  and not line.startswith(("=", "*", "#", "|", "!", ":", ";", "{", "}"))))
    return "\n\n".join(article for article in articles if article)


def held_out_fraction(folder, news, text):
    """The ``--eval-fraction`` of ``text``, which ends with ``news``, that holds out the same
    tokens as ``HELD_OUT`` of ``news`` alone: the held-out windows stay those of the news rows."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    news_ids, ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (news, text))
    held = int(len(news_ids) * HELD_OUT)
    fraction = (held + 0.5) / len(ids)
    if int(len(ids) * fraction) != held or ids[len(ids) - held:] != news_ids[len(news_ids) - held:]:
        sys.exit("the held-out news tokens differ once Wikipedia comes first; the comparison would not be fair")
    return fraction


def other_domain_text(tokens):
    """English from another domain: CPython's documentation topics (programming, not news)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[: tokens * 6]


@functools.lru_cache(maxsize=None)
def perplexity(folder, text, windows):
    """exp(mean next-token loss) over the first ``windows`` windows of ``SEQLEN`` tokens."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])[: windows * SEQLEN]
    batches = ids[: len(ids) // SEQLEN * SEQLEN].reshape(-1, SEQLEN).split(BATCH)
    with torch.no_grad():
        losses = [float(model(input_ids=b, labels=b).loss) * len(b) for b in batches]
    return math.exp(sum(losses) / sum(len(b) for b in batches))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help=f"optimizer steps of {BATCH} x {SEQLEN} tokens")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--other-windows", type=int, default=24, help="windows of the other-domain text")
    parser.add_argument("--workdir", help="keep folders here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--overhead", action="store_true", help="measure step time and peak memory instead")
    parser.add_argument("--score", default="sparsegpt", help="how the models are pruned (default sparsegpt)")
    parser.add_argument("--patterns", nargs="+", help="e.g. 2:4 T2:4 (T: transposable; default 2:4 T2:4 T4:8 T8:16)")
    parser.add_argument("--recoveries", nargs="+", choices=sorted(RECOVERIES),
                        help="default: plain and distilled at 2:4, distilled elsewhere, SR-STE at transposable 2:4")
    parser.add_argument("--no-control", action="store_true", help="skip the dense model's fine-tuning")
    parser.add_argument("--autocast", action="store_true", help="fine-tune in mixed precision (bfloat16 GEMMs)")
    parser.add_argument("--refit", nargs="?", type=float, const=1.0, metavar="DAMPENING",
                        help="prune with --refit (layers refitted to the dense model), at this --refit-dampening "
                             "(default 1.0)")
    parser.add_argument("--wikipedia", action="store_true",
                        help="train on Wikipedia prose too (gensim's test dump, 549k tokens, before the news); "
                             "the held-out news windows stay the same")
    args = parser.parse_args()
    package_folder("gensim")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        dense, calibration, evaluation = prepare(work)
        news = calibration.read_text() + evaluation.read_text()  # all 300 articles; the end is held out
        data, held_out = work / "news.txt", HELD_OUT
        data.write_text(news)
        if args.wikipedia:
            data = work / "wikipedia-news.txt"
            data.write_text(wikipedia_text() + "\n\n" + news)
            held_out = held_out_fraction(dense, news, data.read_text())
        other = other_domain_text(args.other_windows * SEQLEN)
        tokens = args.steps * BATCH * SEQLEN
        common = ["--data", data, "--tokens", tokens, "--seqlen", SEQLEN, "--batch-size", BATCH, "--lr", args.lr,
                  "--eval-every", 0, "--save-every", 0, "--eval-fraction", held_out, *["--autocast"] * args.autocast]
        run_name = f"{args.steps}steps-lr{args.lr:g}{'-autocast' * args.autocast}{'-wikipedia' * args.wikipedia}"
        if args.overhead:
            pruned = work / "T2of4"
            if not pruned.exists():
                command("prune", dense, "--pattern", "2:4", "--transposable", "--score", "sparsegpt",
                        "--calibration", calibration, "--samples", 32, "--seqlen", 512, "-o", pruned)
            print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                  f"{torch.__version__}; SmolLM2-135M; {args.steps} steps of {BATCH} x {SEQLEN} tokens")
            overhead(work, dense, pruned, common)
            return
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}; SmolLM2-135M; fine-tuning on {tokens} tokens ({args.steps} steps of {BATCH} x "
              f"{SEQLEN}), AdamW lr {args.lr} with 5 % warm-up and cosine decay"
              f"{', bfloat16 autocast' if args.autocast else ''}"
              f"{'; training text: Wikipedia prose, then the news' if args.wikipedia else ''}", flush=True)
        print("| model | recovery | held-out news ppl: one-shot | after | other-domain ppl: one-shot | after | "
              "seconds |")
        print("|---|---|---|---|---|---|---|", flush=True)
        rows = []

        def row(label, recovery, folder, out, extra):
            seconds = command("finetune", folder, *common, *extra, "-o", out)
            report = json.loads((out / "finetune_report.json").read_text())
            result = {"model": label, "recovery": recovery, "before": report["perplexity_before"],
                      "after": report["perplexity_after"], "other_before": perplexity(folder, other,
                                                                                      args.other_windows),
                      "other_after": perplexity(out, other, args.other_windows), "seconds": seconds,
                      "sad_per_refresh": report.get("sad_per_refresh")}
            rows.append(result)
            print(f"| {label} | {recovery} | {result['before']:.2f} | {result['after']:.2f} | "
                  f"{result['other_before']:.2f} | {result['other_after']:.2f} | {seconds:.0f} |", flush=True)

        if not args.no_control:
            row("dense", "fine-tuned (control)", dense, work / f"dense-{run_name}",
                ["--allow-dense", "--force"])
        patterns = PATTERNS if args.patterns is None else [(p.lstrip("T"), p.startswith("T")) for p in args.patterns]
        for pattern, transposable in patterns:
            refit = [] if args.refit is None else ["--refit", "--refit-dampening", args.refit]
            name = (f"{args.score}{'' if args.refit is None else f'-refit{args.refit:g}'}-{'T' if transposable else ''}"
                    f"{pattern.replace(':', 'of')}")
            pruned = work / name
            if not pruned.exists():
                command("prune", dense, "--pattern", pattern, *(["--transposable"] if transposable else []),
                        "--score", args.score, *refit, "--calibration", calibration, "--samples",
                        32, "--seqlen", 512, "-o", pruned)
            label = (f"{pattern} {'transposable' if transposable else 'row-wise'} ({args.score}"
                     f"{'' if args.refit is None else f', refit {args.refit:g}'})")
            chosen = args.recoveries or ["distilled"] + (["plain", "bimask"] if pattern == "2:4" else []) + (
                ["srste"] if (pattern, transposable) == ("2:4", True) else [])
            for key in sorted(set(chosen) - ({"bimask"} if transposable else set()), key=list(RECOVERIES).index):
                recovery, extra, distilled = RECOVERIES[key]
                # named by everything that makes the run, and replaced: a rerun in the same workdir repeats it
                row(label, recovery, pruned, work / f"{name}-{key}-{run_name}",
                    [*(["--teacher", dense] if distilled else []), *extra, "--force"])
        for result in rows:
            if result["sad_per_refresh"]:
                flips = ", ".join(f"step {r['step']}: {r['flips']}" for r in result["sad_per_refresh"])
                print(f"SAD per refresh, {result['model']}: {flips}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
