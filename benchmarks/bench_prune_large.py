"""Pruning a model larger than memory, streamed: a random-init Llama of a real size written to
disk block by block, then ``transposable prune`` on it in a fresh process.

The weights are random (normal, std 0.02) in bfloat16, one safetensors shard per block plus
one for the embeddings and the head, with a sharded index, a tokenizer (``--tokenizer``: any
folder with one, e.g. the SmolLM2 folder of ``bench_prune.py``; default: a word-level one
trained on this README in code, so that it runs offline anywhere) and a calibration text
(this README); the vocabulary is the tokenizer's. Time and memory are what this measures:
a random model's masks mean nothing.

Printed: the model's size, the peak resident memory of the prune above the process baseline
(its code: interpreter, torch, transformers, the solver kernels), on CUDA the peak GPU
memory, the time per block, and the estimate of :func:`estimate` beside the measurement.

Presets: ``7b`` (Llama-2-7B's shapes: 32 blocks of 4096 / 11008, 32 heads), ``1b`` (16
blocks of 2048 / 8192, 32 heads, 8 key-value heads: Llama-3.2-1B's shapes), ``70b``
(estimate only: 80 blocks of 8192 / 28672, 64 heads, 8 key-value heads).

Run: python benchmarks/bench_prune_large.py --preset 7b --score wanda --windows 8 --workdir DIR
     python benchmarks/bench_prune_large.py --preset 1b --device cuda --score sparsegpt --json FILE
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"

PRESETS = {
    "7b": {"layers": 32, "hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32},
    "1b": {"layers": 16, "hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8},
    "70b": {"layers": 80, "hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8},
    "tiny": {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2},  # the tests' size
}

PRUNE = """
import sys, time, torch
from transposable.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print("SECONDS", time.perf_counter() - start)
if torch.cuda.is_available():
    print("PEAK_GPU_BYTES", torch.cuda.max_memory_allocated())
with open("/proc/self/status") as f:
    print("PEAK_RSS_BYTES", next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024)
sys.exit(code)
"""

BASELINE = """
import sys, torch
import transposable.cli, transposable.prune, transposable.pretrained, transformers
import transposable as tp
tp.mask(torch.randn(256, 256), "2:4", transposable=True)
with open("/proc/self/status") as f:
    print("PEAK_RSS_BYTES", next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024)
"""


def block_parameters(shape):
    head = shape["hidden"] // shape["heads"]
    attention = 2 * shape["hidden"] ** 2 + 2 * shape["hidden"] * shape["kv_heads"] * head
    return attention + 3 * shape["hidden"] * shape["intermediate"] + 2 * shape["hidden"]


def estimate(shape, score, windows, seqlen, vocab, device="cpu"):
    """Bytes a streamed prune needs beyond its code, from the shapes: ``{"ram", "gpu"}``.

    One block in float32 and four copies of its largest layer while that layer is pruned;
    the activations (``windows x seqlen x hidden x 4``); the statistics: Wanda one vector per
    layer, SparseGPT a Hessian per layer (``in x in``, float64), each freed once its layer is
    pruned, and three more of the layer's own while it is inverted (float64 on the CPU,
    float32 on a GPU) (the worst of: the first layer, with every Hessian still there, and the last,
    ``down_proj``, alone); one window's way through the block and the largest tensor as
    stored while it is read; and, while the first block's inputs are captured, the
    embeddings in float32 and as stored. On CUDA the block, statistics and
    activations are on the GPU and the host holds the embeddings while capturing and one
    tensor at a time.
    """
    hidden, intermediate = shape["hidden"], shape["intermediate"]
    inverting = 8 if device == "cpu" else 4  # the Hessians are summed in float64 everywhere
    block = 4 * block_parameters(shape) + 4 * 4 * hidden * intermediate
    activations = 4 * windows * seqlen * hidden
    statistics = 0
    if score == "sparsegpt":
        statistics = max(8 * (6 * hidden ** 2 + intermediate ** 2) + inverting * 3 * hidden ** 2,
                         8 * intermediate ** 2 + inverting * 3 * intermediate ** 2)
    working = 4 * seqlen * (intermediate * 3 + shape["heads"] * seqlen)  # one window through the block
    working += 2 * hidden * intermediate  # the largest tensor as stored (bfloat16) while it is read
    embedding = (4 + 2) * vocab * hidden  # in float32, and as stored while it is read
    on_device = block + activations + statistics + working
    if device == "cpu":
        return {"ram": max(on_device, embedding + activations), "gpu": 0}
    return {"ram": embedding + 4 * hidden * intermediate, "gpu": max(on_device, embedding + activations)}


def make_model(folder, shape, tokenizer_dir):
    """A random-init Llama of ``shape`` on disk, one block at a time (bfloat16, sharded)."""
    import transformers
    from safetensors.torch import save_file

    if tokenizer_dir is None:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        words.train_from_iterator([README.read_text()], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    folder.mkdir(parents=True)
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=shape["hidden"],
                                      intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    head = shape["hidden"] // shape["heads"]

    def normal(*size):
        return (torch.randn(*size, generator=generator) * 0.02).to(torch.bfloat16)

    weight_map = {}

    def shard(index, tensors):
        name = f"model-{index:05d}-of-{shape['layers'] + 1:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})

    shard(0, {"model.embed_tokens.weight": normal(vocab, shape["hidden"]), "lm_head.weight": normal(vocab, shape["hidden"]),
              "model.norm.weight": torch.ones(shape["hidden"], dtype=torch.bfloat16)})
    kv = shape["kv_heads"] * head
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        shard(i + 1, {p + "self_attn.q_proj.weight": normal(shape["hidden"], shape["hidden"]),
                      p + "self_attn.k_proj.weight": normal(kv, shape["hidden"]),
                      p + "self_attn.v_proj.weight": normal(kv, shape["hidden"]),
                      p + "self_attn.o_proj.weight": normal(shape["hidden"], shape["hidden"]),
                      p + "mlp.gate_proj.weight": normal(shape["intermediate"], shape["hidden"]),
                      p + "mlp.up_proj.weight": normal(shape["intermediate"], shape["hidden"]),
                      p + "mlp.down_proj.weight": normal(shape["hidden"], shape["intermediate"]),
                      p + "input_layernorm.weight": torch.ones(shape["hidden"], dtype=torch.bfloat16),
                      p + "post_attention_layernorm.weight": torch.ones(shape["hidden"], dtype=torch.bfloat16)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return vocab


def run(code, *argv):
    result = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"failed:\n{result.stderr[-3000:]}")
    values = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("SECONDS", "PEAK")))
    blocks = [float(s) for s in re.findall(r"pruned in ([\d.]+) s", result.stderr)]
    return {key: float(value) for key, value in values.items()}, blocks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    parser.add_argument("--layers", type=int, help="override the preset's number of blocks")
    parser.add_argument("--score", default="wanda")
    parser.add_argument("--pattern", default="T2:4", help="e.g. T2:4 (transposable) or 2:4")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", help="a folder with a tokenizer (default: word-level, trained on README.md)")
    parser.add_argument("--workdir", help="keep the model here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    shape = {**PRESETS[args.preset], **({"layers": args.layers} if args.layers else {})}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        model = workdir / f"llama-{args.preset}-{shape['layers']}"
        start = time.perf_counter()
        if not (model / "model.safetensors.index.json").exists():
            shutil.rmtree(model, ignore_errors=True)
            make_model(model, shape, args.tokenizer)
        made = time.perf_counter() - start
        import transformers

        vocab = len(transformers.AutoTokenizer.from_pretrained(model))
        size = 2 * (shape["layers"] * block_parameters(shape) + 2 * vocab * shape["hidden"] + shape["hidden"])
        text = workdir / "calibration.txt"
        text.write_text(README.read_text() * 20)
        baseline = run(BASELINE)[0]["PEAK_RSS_BYTES"]
        pattern = args.pattern.lstrip("T")
        out = workdir / "pruned"
        measured, blocks = run(PRUNE, "prune", model, "--pattern", pattern,
                               *(["--transposable"] if args.pattern.startswith("T") else []), "--score", args.score,
                               "--calibration", text, "--samples", args.windows, "--seqlen", args.seqlen,
                               "--device", args.device, "-o", out, "--force")
        shutil.rmtree(out)
        guess = estimate(shape, args.score, args.windows, args.seqlen, vocab, args.device)
        above = measured["PEAK_RSS_BYTES"] - baseline
        result = {"preset": args.preset, "shape": shape, "vocab": vocab, "bfloat16_bytes": size, "score": args.score,
                  "pattern": args.pattern, "windows": args.windows, "seqlen": args.seqlen, "device": args.device,
                  "seconds": measured["SECONDS"], "seconds_per_block": blocks, "made_seconds": made,
                  "peak_rss_above_baseline": above, "baseline": baseline,
                  "peak_gpu": measured.get("PEAK_GPU_BYTES"), "estimate": guess,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"}
        gib = 2 ** 30
        print(f"machine: {result['machine']}; model: random Llama {args.preset} shapes, {shape['layers']} blocks, "
              f"{size / gib:.1f} GiB in bfloat16 ({2 * size / gib:.1f} GiB in float32), written in {made:.0f} s")
        print(f"prune: {args.score} {args.pattern}, {args.windows} x {args.seqlen} tokens, device {args.device}: "
              f"{measured['SECONDS']:.0f} s, {sum(blocks) / max(len(blocks), 1):.1f} s per block")
        print(f"peak RSS above the process baseline: {above / gib:.2f} GiB (estimate {guess['ram'] / gib:.2f} GiB); "
              f"{above / size:.3f}x the bfloat16 model")
        if result["peak_gpu"] is not None:
            print(f"peak GPU memory: {result['peak_gpu'] / gib:.2f} GiB (estimate {guess['gpu'] / gib:.2f} GiB)")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
