"""Fingerprints of what pruning and fine-tuning write, to hold a refactoring to the same results.

``python tests/golden_pruning.py --write`` runs every case below and stores, per changed
tensor, a fingerprint (its non-zero pattern, exactly, and three float64 sums of its values)
in ``tests/data/golden_pruning.json``; ``tests/test_golden_pruning.py`` runs the cases again
and compares. Written before the pruning path became a recipe of steps (issue 30), so that
the reshaped code is checked against what the old code wrote: every score, row-wise and
transposable, channel permutations, GPT-2's ``Conv1D``, a SmolLM2-shaped random block, a
streamed model folder, and fine-tuning with distillation, fixed masks and SR-STE.

Inputs are made in code from seeds (tiny random models, token ids, a synthetic text), never
read from files that change. Permutation searches (tiny models only: SmolLM2's MLP dimension
takes over a minute) get a budget they never use up, so that they stop at their local
optimum, not at a clock.
"""
import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "golden_pruning.json"

#: A budget the tiny models' searches never reach.
SEARCH_SECONDS = 60.0


def fingerprint(tensor):
    """``{"nonzero": sha256 of the non-zero map, "sums": [sum, sum of squares, weighted sum]}``.

    The weighted sum uses weights that change along every axis, so a permutation of the
    values changes it."""
    values = tensor.detach().double().cpu().contiguous()
    nonzero = (values != 0).numpy()
    positions = torch.arange(values.numel(), dtype=torch.float64).reshape(values.shape)
    weights = torch.remainder(positions * 0.6180339887, 1.0) + 0.5
    return {"shape": list(values.shape),
            "nonzero": hashlib.sha256(np.packbits(nonzero).tobytes()).hexdigest(),
            "sums": [float(values.sum()), float(values.pow(2).sum()), float((values * weights).sum())]}


def llama(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def smollm2_shaped(seed=0):
    """One block of SmolLM2-135M's shapes: hidden 576, MLP 1536, 9 heads, 3 key/value heads."""
    return llama(hidden=576, intermediate=1536, layers=1, heads=9, kv_heads=3, seed=seed)


def gpt2(seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def token_batches(batches=3, rows=4, length=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (rows, length), generator=generator) for _ in range(batches)]


def synthetic_text(words=6000, seed=2):
    rng = np.random.default_rng(seed)
    return " ".join(f"w{int(k)}" for k in rng.zipf(1.3, words) % 400)


def changed(model, before):
    """Fingerprints of the parameters that differ from ``before``."""
    return {name: fingerprint(value) for name, value in model.state_dict().items()
            if name in before and not torch.equal(value, before[name])}


#: In-memory prunes: (case, model maker, pattern, keyword options of prune()).
PRUNES = [(f"llama-{score}-{'t' if transposable else 'r'}2:4", llama, "2:4",
           dict(score=score, transposable=transposable, **({"steps": 20} if score == "adaprune" else {})))
          for score in ("sparsegpt", "wanda", "magnitude", "adaprune") for transposable in (True, False)] + [
    ("llama-sparsegpt-t4:8-permute", llama, "4:8", dict(score="sparsegpt", permute=True,
                                                         permute_seconds=SEARCH_SECONDS)),
    ("llama-adaprune-t2:4-permute", llama, "2:4", dict(score="adaprune", steps=10, permute=True,
                                                        permute_seconds=SEARCH_SECONDS)),
    ("llama-sparsegpt-layers-dampening", llama, "2:4", dict(score="sparsegpt", dampening=0.1,
                                                         layers=["*.mlp.*", "model.layers.0.self_attn.q_proj"])),
    ("gpt2-sparsegpt-t2:4", gpt2, "2:4", dict(score="sparsegpt")),
    ("gpt2-wanda-t2:4-permute", gpt2, "2:4", dict(score="wanda", permute=True, permute_seconds=SEARCH_SECONDS)),
    ("smollm2-sparsegpt-t2:4", smollm2_shaped, "2:4", dict(score="sparsegpt")),
    ("smollm2-wanda-r2:4", smollm2_shaped, "2:4", dict(score="wanda", transposable=False)),
]


def run_prune(make, pattern, options):
    from transposable.prune import prune

    model = make()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    report = []
    prune(model, token_batches(), pattern, report=report, **options)
    return {"tensors": changed(model, before),
            "report": [[entry.name, entry.status, round(entry.kept_l1, 9) if entry.kept_l1 is not None else None]
                       for entry in report]}


def folder_cases(root):
    """A streamed prune of a saved folder, and fine-tuning its result three ways."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from transposable.finetune import Recipe, finetune
    from transposable.pretrained import prune_pretrained

    text = synthetic_text()
    (root / "text.txt").write_text(text)
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=256, special_tokens=["[UNK]"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    dense = llama()
    dense.save_pretrained(root / "dense", max_shard_size="60KB")
    tokenizer.save_pretrained(root / "dense")
    results = {}
    for name, options in (("folder-streamed-sparsegpt-t2:4", dict(score="sparsegpt")),
                          ("folder-streamed-wanda-t4:8-permute", dict(score="wanda", permute=True,
                                                                      permute_seconds=SEARCH_SECONDS))):
        out = root / name.replace(":", "of")
        prune_pretrained(root / "dense", out, root / "text.txt", "4:8" if "4:8" in name else "2:4", samples=4,
                         seqlen=32, device="cpu", stream=True, **options)
        results[name] = folder_tensors(out, dense)
    pruned = root / "folder-streamed-sparsegpt-t2of4"
    for name, teacher, options in (("finetune-fixed-distilled", root / "dense", {}),
                                   ("finetune-srste", None, dict(masks="srste", refresh_every=2)),
                                   ("finetune-hidden-accumulated", root / "dense", dict(hidden_weight=0.5,
                                                                                        accumulation=2))):
        recipe = Recipe(tokens=4 * 4 * 32 * options.get("accumulation", 1), seqlen=32, batch_size=4, lr=3e-3,
                        eval_every=2, save_every=0, **options)
        out = root / name
        finetune(pruned, out, root / "text.txt", teacher=teacher, recipe=recipe)
        results[name] = folder_tensors(out, dense)
    return results


def folder_tensors(folder, dense):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return {"tensors": changed(model, dense.state_dict())}


def compute():
    results = {case: run_prune(make, pattern, options) for case, make, pattern, options in PRUNES}
    with tempfile.TemporaryDirectory() as root:
        results.update(folder_cases(Path(root)))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"store the fingerprints in {GOLDEN}")
    args = parser.parse_args(argv)
    results = compute()
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(results)} cases to {GOLDEN}")
    else:
        print(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
