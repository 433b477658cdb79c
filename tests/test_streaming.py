"""Pruning model folders one block at a time (``prune_pretrained(stream=True)``, the default):
the same tensors as loading the whole model, for every score, pattern, model family and
checkpoint kind; one block in memory at a time; activations in a file; clear errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transposable as tp
from transposable.pretrained import StreamedBlocks, find_checkpoint, prune_pretrained
from transposable.prune import SCORES, prune

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from test_prune import tiny_gpt2, tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def save_folder(model, folder, tokenizer, kind):
    """``model`` as a Hugging Face folder whose checkpoint is one ``.safetensors`` file,
    several shards, or a ``pytorch_model.bin``."""
    if kind == "bin":
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, **({"max_shard_size": "60KB"} if kind == "sharded" else {}))
    tokenizer.save_pretrained(folder)
    return folder


def word_tokenizer(text, vocab=256):
    """A word-level tokenizer trained on ``text`` in code (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=["[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    text = (REPO / "README.md").read_text()
    tokenizer = word_tokenizer(text)
    (root / "calibration.txt").write_text(text)
    for family, make in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        for kind in ("single", "sharded", "bin"):
            save_folder(make(), root / f"{family}-{kind}", tokenizer, kind)
    assert len(list((root / "llama-sharded").glob("*.safetensors"))) > 2  # really sharded
    return root


def tensors(folder):
    """Every tensor of a pruned folder's checkpoint, by name."""
    path, fmt = find_checkpoint(folder)
    return {name: fmt.read_tensor(path, name)[0] for name in fmt.names(path)}


def run_both(folders, tmp_path, source, pattern, transposable, score, **settings):
    written = {}
    for stream in (False, True):
        out = tmp_path / f"stream-{stream}"
        prune_pretrained(folders / source, out, folders / "calibration.txt", pattern, transposable=transposable,
                         score=score, samples=4, seqlen=32, stream=stream, device="cpu", **settings)
        written[stream] = out
    return written[False], written[True]


def assert_same_folders(a, b):
    ours, theirs = tensors(b), tensors(a)
    assert list(ours) == list(theirs)
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, different[:3]
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())  # nothing left behind
    report_a, report_b = (json.loads((f / "pruning_report.json").read_text()) for f in (a, b))
    assert [layer["name"] for layer in report_a["layers"]] == [layer["name"] for layer in report_b["layers"]]
    assert (report_a["stream"], report_b["stream"]) == (False, True) and report_b["device"] == "cpu"


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("pattern,transposable", [("2:4", True), ("4:8", True), ("2:4", False)])
def test_streamed_llama_equals_the_whole_model_path_for_every_score_and_pattern(folders, tmp_path, score, pattern,
                                                                                  transposable):
    in_memory, streamed = run_both(folders, tmp_path, "llama-single", pattern, transposable, score)
    assert_same_folders(in_memory, streamed)
    model = transformers.AutoModelForCausalLM.from_pretrained(streamed)  # plain transformers loads it
    check = tp.is_transposable_nm if transposable else tp.is_nm_sparse
    assert all(check(model.get_submodule(f"model.layers.{i}.mlp.down_proj").weight, pattern) for i in range(2))


@pytest.mark.parametrize("source", ["llama-sharded", "llama-bin", "gpt2-single", "gpt2-sharded", "gpt2-bin"])
@pytest.mark.parametrize("score", ["sparsegpt", "adaprune"])
def test_streamed_sharded_pytorch_and_gpt2_checkpoints_equal_the_whole_model_path(folders, tmp_path, source, score):
    in_memory, streamed = run_both(folders, tmp_path, source, "2:4", True, score)
    assert_same_folders(in_memory, streamed)
    if "sharded" in source:
        index = json.loads((streamed / "model.safetensors.index.json").read_text())
        assert index["metadata"]["transposable.pattern"] == "2:4"
        assert sorted(p.name for p in streamed.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))


def test_permuted_and_offloaded_streaming_equals_the_whole_model_path(folders, tmp_path):
    spill = tmp_path / "activations"
    spill.mkdir()
    # A budget every search converges in (the MLP dimension takes about 4 s here): a search
    # stopped by its clock keeps whatever its rounds reached, which differs from run to run.
    in_memory, streamed = run_both(folders, tmp_path, "llama-single", "2:4", True, "adaprune", permute=True,
                                   permute_seconds=30, offload_activations=spill)
    assert_same_folders(in_memory, streamed)
    assert list(spill.iterdir()) == []  # the activation files are gone


@pytest.mark.parametrize("source", ["llama-single", "gpt2-single"])
def test_refit_streamed_and_offloaded_equals_the_whole_model_path(folders, tmp_path, source):
    # The refit runs a dense copy of each block on the dense model's inputs, which are
    # offloaded too; a streamed block's copy must be of its loaded weights.
    spill = tmp_path / "activations"
    spill.mkdir()
    in_memory, streamed = run_both(folders, tmp_path, source, "2:4", True, "sparsegpt", refit=True,
                                   offload_activations=spill)
    assert_same_folders(in_memory, streamed)
    assert list(spill.iterdir()) == []
    assert json.loads((streamed / "pruning_report.json").read_text())["recipe"]["refit"] is True


def test_only_one_block_holds_weights_at_a_time(folders, tmp_path):
    """While block k is pruned every other block is on the meta device, and the embeddings
    were freed once the first block's inputs were captured."""
    seen = []

    class Watching(StreamedBlocks):
        def load(self, prefix, block):
            super().load(prefix, block)
            layers = self.model.model.layers
            seen.append(([p.device.type for p in layers.parameters()].count("meta"),
                         sum(p.numel() for p in layers.parameters() if p.device.type != "meta"),
                         self.model.model.embed_tokens.weight.device.type))

        def unload(self, prefix, block, entries):
            super().unload(prefix, block, entries)
            assert all(p.device.type == "meta" for p in block.parameters())

    tokenizer = transformers.AutoTokenizer.from_pretrained(folders / "llama-single")
    windows = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    folder = tmp_path / "out"
    folder.mkdir()
    loader = Watching(transformers, folders / "llama-single", find_checkpoint(folders / "llama-single"),
                      torch.device("cpu"), folder / "spill", "wanda")
    assert loader.model.model.embed_tokens.weight.device.type == "cpu"  # read: the first block needs it
    assert loader.model.lm_head.weight.device.type == "meta" or loader.model.config.tie_word_embeddings
    assert all(p.device.type == "meta" for p in loader.model.model.layers.parameters())
    prune(loader.model, windows, "2:4", score="wanda", block_loader=loader)
    per_block = sum(p.numel() for p in loader.model.model.layers[0].parameters())
    one_block_of = len(list(loader.model.model.layers[0].parameters()))
    assert seen == [(one_block_of, per_block, "meta")] * 2
    assert len(loader.written) == 14 and tokenizer is not None
    loader.close()
    assert not (folder / "spill").exists()


PEAK = """
import gc, sys
sys.path.insert(0, {tests!r})
import torch, transformers
from transposable.pretrained import prune_pretrained
import transposable as tp
tp.mask(torch.randn(8, 8), "2:4", transposable=True)  # the compiled solver: a one-time cost
folder, out, calibration, stream = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
transformers.AutoTokenizer.from_pretrained(folder)
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) here
before = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
prune_pretrained(folder, out, calibration, "2:4", score="magnitude", samples=2, seqlen=32, stream=stream,
                 device="cpu")
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print((peak - before) * 1024)
"""


def test_streamed_peak_memory_does_not_grow_with_the_model(folders, tmp_path):
    """Eight blocks of 16 MiB against two: the whole-model path grows by the six blocks, the
    streamed one by less than one."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders / "llama-single")
    extra = {}
    for layers in (2, 8):
        folder = save_folder(tiny_llama(layers=layers, hidden=512, intermediate=2048), tmp_path / f"l{layers}",
                             tokenizer, "single")
        for stream in (False, True):
            result = subprocess.run([sys.executable, "-c", PEAK.format(tests=str(Path(__file__).parent)), folder,
                                     tmp_path / f"out-{layers}-{stream}", folders / "calibration.txt", str(int(stream))],
                                    capture_output=True, text=True, timeout=600,
                                    env={**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
            assert result.returncode == 0, result.stderr
            extra[layers, stream] = int(result.stdout.split()[-1])
    block = sum(p.numel() for p in tiny_llama(layers=1, hidden=512, intermediate=2048).model.layers[0].parameters()) * 4
    assert extra[8, False] - extra[2, False] > 5 * block, extra  # the measurement sees whole-model loading
    assert extra[8, True] - extra[2, True] < block, extra


def prune_cli(*argv):
    return subprocess.run([sys.executable, "-m", "transposable", "prune", *map(str, argv)], capture_output=True,
                          text=True, timeout=600)


def test_cli_streams_by_default_and_takes_device_offload_and_in_memory(folders, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    common = ["--pattern", "2:4", "--calibration", folders / "calibration.txt", "--samples", "4", "--seqlen", "32",
              "--score", "wanda"]
    first = prune_cli(folders / "gpt2-sharded", *common, "--device", "cpu", "--offload-activations", spill,
                      "-o", tmp_path / "a")
    second = prune_cli(folders / "gpt2-sharded", *common, "--in-memory", "-o", tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert_same_folders(tmp_path / "b", tmp_path / "a")
    assert "--offload-activations DIR" in prune_cli("--help").stdout


@pytest.mark.parametrize("option,value,match", [
    ("--device", "tpu", r"device 'tpu' is not a device name; use cpu, cuda or cuda:K"),
    ("--device", "cuda:7", r"device 'cuda:7' is not here \(this machine has \d+ CUDA device\(s\)\)"),
    ("--offload-activations", "nowhere", r"offload_activations '.*nowhere' is not there; give an existing folder"),
])
def test_cli_refuses_a_device_or_folder_that_is_not_there_in_one_line(folders, tmp_path, option, value, match):
    if value == "nowhere":
        value = tmp_path / "nowhere"
    result = prune_cli(folders / "llama-single", "--pattern", "2:4", "--calibration", folders / "calibration.txt",
                       "--samples", "2", "--seqlen", "32", option, value, "-o", tmp_path / "out")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert re.search(match, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_a_block_tensor_is_refused_before_pruning(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    for item in (folders / "llama-single").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"][:, :64].contiguous()
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"do not match its config.json: model.layers.0.mlp.down_proj.weight \[64, 64\] "
                                         r"where the model has \[64, 128\]"):
        prune_pretrained(folder, tmp_path / "out", folders / "calibration.txt", "2:4", samples=2, seqlen=32)
    weights["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 128)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 of the model's tensors are not in the checkpoint "
                                         r"\(e.g. 'model.layers.1.mlp.up_proj.weight'\)"):
        prune_pretrained(folder, tmp_path / "out", folders / "calibration.txt", "2:4", samples=2, seqlen=32)
    assert not (tmp_path / "out").exists()
