"""transposable finetune: recovery of a pruned model under its masks, on tiny random models."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transposable as tp
from transposable.finetune import Recipe, finetune, nm_layers

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def tiny(hidden=64):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A dense tiny LLaMA folder with a word-level tokenizer, its transposable 2:4 prune, and a text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from transposable.pretrained import prune_pretrained

    root = tmp_path_factory.mktemp("finetune")
    text = (REPO / "README.md").read_text()
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=256, special_tokens=["[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    for name, model in (("dense", tiny()), ("wide", tiny(hidden=128))):
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
    (root / "text.txt").write_text(text)
    prune_pretrained(root / "dense", root / "pruned", root / "text.txt", "2:4", transposable=True, score="magnitude",
                     samples=4, seqlen=32)
    return root


def recipe(**changes):
    options = dict(tokens=6 * 4 * 32, seqlen=32, batch_size=4, lr=3e-3, eval_every=0, save_every=0)
    return Recipe(**{**options, **changes})


def weights(folder):
    return dict(transformers.AutoModelForCausalLM.from_pretrained(folder).named_parameters())


def test_fixed_masks_are_kept_the_loss_falls_and_the_folder_loads(folders, tmp_path):
    out = tmp_path / "recovered"
    report = finetune(folders / "pruned", out, folders / "text.txt", recipe=recipe())
    before, after = weights(folders / "pruned"), weights(out)
    layers = nm_layers(transformers.AutoModelForCausalLM.from_pretrained(folders / "pruned"), folders / "pruned")
    assert len(layers) == 14 and {str(p) for p, _ in layers.values()} == {"2:4"}
    for name in layers:
        old, new = before[f"{name}.weight"], after[f"{name}.weight"]
        assert tp.is_transposable_nm(new, "2:4"), name
        assert not bool(((new != 0) & (old == 0)).any()), name  # the same mask: nothing grew back
        assert not torch.equal(old, new), name  # and it trained
    assert report["steps"] == 6 and report["tokens"] == 6 * 4 * 32
    losses = [entry["loss"] for entry in report["history"]["loss"]]
    assert losses[-1] < losses[0] and report["perplexity_after"] < report["perplexity_before"]
    for name in ("config.json", "tokenizer.json", "pruning_report.json"):
        assert (out / name).read_bytes() == (folders / "pruned" / name).read_bytes()
    assert json.loads((out / "finetune_report.json").read_text())["steps"] == 6
    assert not Path(f"{out}.checkpoints").exists()


def test_layers_are_read_from_the_zeros_without_a_report(folders, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(folders / "pruned", bare)
    (bare / "pruning_report.json").unlink()
    model = transformers.AutoModelForCausalLM.from_pretrained(bare)
    found = nm_layers(model, bare)
    assert found == nm_layers(model, folders / "pruned")  # the zeros say what the report says
    assert all(t for _, t in found.values())


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(folders, tmp_path):
    whole = tmp_path / "whole"
    finetune(folders / "pruned", whole, folders / "text.txt", recipe=recipe(save_every=3, eval_every=3))

    def stop_at_step_3(line):
        if line.startswith("step 3/"):
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        finetune(folders / "pruned", cut, folders / "text.txt", recipe=recipe(save_every=3, eval_every=3),
                 log=stop_at_step_3)
    assert not cut.exists() and [p.name for p in Path(f"{cut}.checkpoints").iterdir()] == ["step-3.pt"]
    report = finetune(folders / "pruned", cut, folders / "text.txt", recipe=recipe(save_every=3, eval_every=3),
                      resume=True)
    assert report["steps"] == 6
    for (name, a), b in zip(weights(whole).items(), weights(cut).values()):
        assert torch.equal(a, b), name


def test_distillation_and_srste_refreshes(folders, tmp_path):
    out = tmp_path / "distilled"
    report = finetune(folders / "pruned", out, folders / "text.txt", teacher=folders / "dense",
                      recipe=recipe(masks="srste", refresh_every=2, hidden_weight=0.5))
    assert report["teacher"] == str(folders / "dense") and len(report["sad"]) == 3  # refreshes at steps 2, 4, 6
    for name, weight in weights(out).items():
        if name.endswith("proj.weight"):
            assert tp.is_transposable_nm(weight, "2:4"), name


def test_srste_with_a_teacher_starts_from_dense_weights_and_regrows(folders, tmp_path):
    """Pruned entries take the teacher's values under the pruned masks: the model computes
    what the pruned one does at step 0, and refreshes move weights in and out."""
    fixed = finetune(folders / "pruned", tmp_path / "fixed", folders / "text.txt", teacher=folders / "dense",
                     recipe=recipe(lr=1e-2))
    report = finetune(folders / "pruned", tmp_path / "regrown", folders / "text.txt", teacher=folders / "dense",
                      recipe=recipe(masks="srste", refresh_every=2, lr=1e-2))
    assert report["perplexity_before"] == pytest.approx(fixed["perplexity_before"], rel=1e-6)
    assert report["pruned_weights_from"] == "teacher" and fixed["pruned_weights_from"] is None
    assert [r["step"] for r in report["sad_per_refresh"]] == [2, 4, 6]
    assert sum(r["flips"] for r in report["sad_per_refresh"]) > 0  # weights moved in and out of the masks
    pruned, regrown = weights(folders / "pruned"), weights(tmp_path / "regrown")
    changed = 0
    for name, weight in regrown.items():
        if name.endswith("proj.weight"):
            assert tp.is_transposable_nm(weight, "2:4"), name
            changed += int(((weight != 0) != (pruned[name] != 0)).sum())
    assert changed > 0  # the written masks are not the pruned ones


@pytest.mark.parametrize("case,match", [
    ("dense", r"no linear layer of '.*dense' is N:M: prune it first"),
    ("teacher", r"teacher '.*wide' has hidden_size=128 but the model has 64; distill from the dense model"),
    ("short", r"the data text has \d+ tokens: too short for 4 training windows of 32 tokens"),
    ("empty", r"data file '.*empty.txt' is empty"),
    ("resume", r"nothing to resume: '.*out.checkpoints' holds no checkpoint"),
    ("tokens", r"tokens=8 is less than one optimizer step of batch_size \* accumulation \* seqlen = 128 tokens"),
])
def test_errors_before_any_training(folders, tmp_path, case, match):
    model, text, options = folders / "pruned", folders / "text.txt", {}
    if case == "dense":
        model = folders / "dense"
    elif case == "teacher":
        options["teacher"] = folders / "wide"
    elif case in ("short", "empty"):
        text = tmp_path / f"{case}.txt"
        text.write_text("a few words" if case == "short" else " \n")
    elif case == "resume":
        options["resume"] = True
    with pytest.raises(ValueError, match=match):
        finetune(model, tmp_path / "out", text, recipe=recipe(tokens=8) if case == "tokens" else recipe(), **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in tmp_path.iterdir()
                                                                 if p.suffix == ".txt")


@pytest.mark.parametrize("option,value,match", [
    ("seqlen", 0, "seqlen must be a positive integer, got 0"),
    ("eval_every", -1, "eval_every must be a non-negative integer, got -1"),
    ("lr", float("nan"), "lr must be a non-negative number, got nan"),
    ("warmup", 1.0, r"warmup must be a fraction in \[0, 1\), got 1.0"),
    ("eval_fraction", 0.0, r"eval_fraction must be in \(0, 1\), got 0.0"),
    ("masks", "dense", "masks must be 'fixed' or 'srste', got 'dense'"),
    ("dtype", "float16", "dtype must be 'float32' or 'bfloat16', got 'float16'"),
    ("autocast", "yes", "autocast must be True or False, got 'yes'"),
    ("backward_mask", 1, "backward_mask must be True or False, got 1"),
])
def test_every_bad_option_is_named_with_its_value(option, value, match):
    with pytest.raises(ValueError, match=match):
        recipe(**{option: value}).check()


def test_the_command_prints_one_summary_and_errors_in_one_line(folders, tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "transposable", "finetune", *map(str, argv)],
                              capture_output=True, text=True, timeout=600)

    common = ["--data", folders / "text.txt", "--tokens", 256, "--seqlen", 32, "--eval-every", 1]
    result = run(folders / "pruned", *common, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "fine-tuned 14 N:M layers on 256 tokens (2 steps" in result.stdout
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == ["step 0/2", "step 1/2", "step 2/2"]
    failed = run(folders / "dense", *common, "-o", tmp_path / "other")
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1
    assert failed.stderr.startswith("transposable finetune: error: no linear layer")


def test_a_dense_model_trains_only_when_allowed_as_an_experiments_control(folders, tmp_path):
    report = finetune(folders / "dense", tmp_path / "control", folders / "text.txt", recipe=recipe(),
                      allow_dense=True)
    assert report["layers"] == {} and report["perplexity_after"] < report["perplexity_before"]
    before, after = weights(folders / "dense"), weights(tmp_path / "control")
    assert all(not torch.equal(before[name], after[name]) for name in before if name.endswith("proj.weight"))


def test_bfloat16_training_keeps_the_masks(folders, tmp_path):
    report = finetune(folders / "pruned", tmp_path / "bf16", folders / "text.txt", recipe=recipe(dtype="bfloat16"))
    assert report["recipe"]["dtype"] == "bfloat16" and math.isfinite(report["perplexity_after"])
    for name, weight in weights(tmp_path / "bf16").items():
        if name.endswith("proj.weight"):
            assert tp.is_transposable_nm(weight, "2:4"), name


@pytest.mark.parametrize("autocast", [False, True])
def test_autocast_runs_student_and_teacher_in_bfloat16_and_keeps_float32_weights(folders, tmp_path, autocast):
    seen = set()  # (trained, grad enabled, output dtype) of every linear layer's forward

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            seen.add((module.weight.requires_grad, torch.is_grad_enabled(), output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        report = finetune(folders / "pruned", tmp_path / "out", folders / "text.txt", teacher=folders / "dense",
                          recipe=recipe(autocast=autocast))
    finally:
        handle.remove()
    half = {(trained, grad) for trained, grad, dtype in seen if dtype == torch.bfloat16}
    # training steps: the student with gradients, the teacher without; evaluations stay float32
    assert half == ({(True, True), (False, False)} if autocast else set())
    assert (True, False, torch.float32) in seen and math.isfinite(report["perplexity_after"])
    assert report["perplexity_after"] < report["perplexity_before"]
    for name, weight in weights(tmp_path / "out").items():
        assert weight.dtype == torch.float32
        if name.endswith("proj.weight"):
            assert tp.is_transposable_nm(weight, "2:4"), name


def test_a_backward_mask_trains_row_wise_layers_with_their_column_wise_input_gradients(folders, tmp_path):
    from transposable.pretrained import prune_pretrained

    rowwise = tmp_path / "rowwise"
    prune_pretrained(folders / "dense", rowwise, folders / "text.txt", "2:4", transposable=False, score="magnitude",
                     samples=4, seqlen=32)
    seen = set()  # backward_mask of every sparse layer that ran a training forward

    def record(module, inputs, output):
        if isinstance(module, tp.nn.SparseLinear) and torch.is_grad_enabled():
            seen.add(module.backward_mask)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        report = finetune(rowwise, tmp_path / "bimask", folders / "text.txt", recipe=recipe(backward_mask=True))
    finally:
        handle.remove()
    assert seen == {True} and report["recipe"]["backward_mask"] is True
    assert report["perplexity_after"] < report["perplexity_before"]
    finetune(rowwise, tmp_path / "exact", folders / "text.txt", recipe=recipe())
    pruned, bimask, exact = weights(rowwise), weights(tmp_path / "bimask"), weights(tmp_path / "exact")
    trained = [name for name in pruned if name.endswith("proj.weight")]
    for name in trained:
        assert tp.is_nm_sparse(bimask[name], "2:4") and not bool(((bimask[name] != 0) & (pruned[name] == 0)).any())
    # the same run but for the input gradients: the earlier layers learn something else
    assert any(not torch.equal(bimask[name], exact[name]) for name in trained)
    with pytest.raises(ValueError, match="backward_mask is for row-wise N:M layers, and .* is transposable N:M"):
        finetune(folders / "pruned", tmp_path / "refused", folders / "text.txt", recipe=recipe(backward_mask=True))
    assert not (tmp_path / "refused").exists()


def test_gpt2_conv1d_layers_are_fine_tuned_along_their_input_features(folders, tmp_path):
    from transposable.pretrained import prune_pretrained

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folders / "dense" / name).exists():
            shutil.copyfile(folders / "dense" / name, tmp_path / "gpt2" / name)
    prune_pretrained(tmp_path / "gpt2", tmp_path / "pruned", folders / "text.txt", "2:4", transposable=False,
                     score="magnitude", samples=4, seqlen=32)
    finetune(tmp_path / "pruned", tmp_path / "out", folders / "text.txt", recipe=recipe())
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    attention = model.transformer.h[0].attn.c_attn.weight  # stored (in, out): groups run down its columns
    assert tp.is_nm_sparse(attention.t(), "2:4") and not tp.is_nm_sparse(attention, "2:4")


def test_sigterm_leaves_the_last_checkpoint_and_no_output(folders, tmp_path):
    import signal

    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "transposable", "finetune", str(folders / "pruned"), "--data",
                                str(folders / "text.txt"), "--tokens", str(40 * 4 * 32), "--seqlen", "32",
                                "--save-every", "1", "--eval-every", "1", "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("step 2/"):  # saved at step 2, then evaluated: a checkpoint is complete
            break
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert process.stderr.read().endswith("transposable finetune: terminated; no output was written\n")
    assert not out.exists()
    saved = [p.name for p in Path(f"{out}.checkpoints").iterdir()]  # the newest, and the one before it if the
    assert saved and all(name.startswith("step-") and name.endswith(".pt") for name in saved)  # signal beat its removal
    assert max(int(name[5:-3]) for name in saved) >= 2
