"""Checkpoint conversion on real files (.pt, safetensors, sharded safetensors), selection
rules, safety (no partial output, no overwrite), the report, AdaPrune and the demo."""
import collections
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import transposable as tp
import transposable.convert as tconvert
from transposable.adaprune import adaprune, recalibrate_batch_norm
from transposable.cli import main
from transposable.convert import convert_checkpoint
from transposable.demo import load_digits


def small_model():
    torch.manual_seed(0)
    return nn.ModuleDict({
        "embed": nn.Embedding(16, 8),
        "conv": nn.Conv2d(8, 16, 3),
        "norm": nn.LayerNorm(16),
        "fc": nn.Linear(16, 32),
        "head": nn.Linear(32, 10),  # 10 outputs: does not tile at M = 4
    })


def state(dtype=torch.float32):
    trained = small_model().state_dict()
    converted = collections.OrderedDict((k, v.to(dtype)) for k, v in trained.items())
    converted._metadata = trained._metadata  # what load_state_dict reads module versions from
    return converted


def bits(tensor):
    return tensor.contiguous().view(torch.uint8)


def expected(weight, pattern, transposable):
    mask = tp.transposable_mask(weight, pattern) if transposable else tp.nm_mask(weight, pattern)
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))


def check_converted(original, converted, pattern, transposable, names):
    assert list(converted) == list(original)  # names and order
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and converted[name].shape == tensor.shape
        if name in names:
            checker = tp.is_transposable_nm if transposable else tp.is_nm_sparse
            assert checker(converted[name], pattern)
            assert torch.equal(bits(converted[name]), bits(expected(tensor, pattern, transposable)))
        else:
            assert torch.equal(bits(converted[name]), bits(tensor))  # bit-identical


CONVERTED = {"conv.weight", "fc.weight"}  # transposable: head (10 outputs) does not tile
CONVERTED_ROWWISE = CONVERTED | {"head.weight"}  # row-wise needs only 'in' to tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposable", [False, True])
def test_pt_round_trip(tmp_path, dtype, transposable):
    original = state(dtype)
    torch.save(original, tmp_path / "model.pt")
    report = convert_checkpoint(tmp_path / "model.pt", tmp_path / "out.pt", "2:4", transposable=transposable)
    converted = torch.load(tmp_path / "out.pt", weights_only=True)
    names = CONVERTED if transposable else CONVERTED_ROWWISE
    check_converted(original, converted, "2:4", transposable, names)
    assert converted._metadata["transposable"]["transposable.pattern"] == "2:4"
    assert converted._metadata[""] == original._metadata[""]  # module metadata kept
    model = small_model()
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    assert {t.name for t in report.tensors if t.status == "converted"} == names


def test_pt_nested_checkpoint_keeps_its_structure(tmp_path):
    original = state()
    torch.save({"model": original, "epoch": 7, "note": "trained"}, tmp_path / "ckpt.pth")
    convert_checkpoint(tmp_path / "ckpt.pth", tmp_path / "out.pth", "2:4", transposable=True)
    converted = torch.load(tmp_path / "out.pth", weights_only=True)
    assert converted["epoch"] == 7 and converted["note"] == "trained"
    check_converted(original, converted["model"], "2:4", True, CONVERTED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_round_trip_is_streamed_and_keeps_metadata(tmp_path, dtype):
    save_file(state(dtype), tmp_path / "model.safetensors", metadata={"format": "pt", "origin": "test"})
    report = convert_checkpoint(tmp_path / "model.safetensors", tmp_path / "out.safetensors", "4:8",
                                transposable=True, method="cyclecanceling")
    original = load_file(tmp_path / "model.safetensors")  # in the file's own tensor order
    check_converted(original, load_file(tmp_path / "out.safetensors"), "4:8", True, CONVERTED)
    with safe_open(tmp_path / "out.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["origin"] == "test"
    assert meta["transposable.pattern"] == "4:8" and meta["transposable.method"] == "cyclecanceling"
    assert meta["transposable.version"] == tp.__version__
    statuses = {t.name: t.status for t in report.tensors}
    assert statuses["head.weight"].startswith("left dense")
    assert statuses["embed.weight"] == "skipped: excluded by *embed*"
    assert statuses["norm.weight"] == "skipped: 1-D"


def check_converted_padded(original, converted, pattern):
    for name in ("conv.weight", "fc.weight", "head.weight"):
        assert tp.is_transposable_nm(converted[name], pattern)
        kept = converted[name] != 0
        assert torch.equal(converted[name][kept], original[name][kept])


def test_padded_conversion_masks_valid(tmp_path):
    original = state()
    save_file(original, tmp_path / "m.safetensors")
    convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors", "2:4", transposable=True, pad=True)
    check_converted_padded(original, load_file(tmp_path / "o.safetensors"), "2:4")


def make_sharded(folder, dtype=torch.float32):
    original = state(dtype)
    names = list(original)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: original[n] for n in members}, folder / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in members})
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return original, folder / "model.safetensors.index.json"


def test_sharded_round_trip(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    original, index = make_sharded(tmp_path / "in")
    convert_checkpoint(index, tmp_path / "out" / "model.safetensors.index.json", "2:4", transposable=True)
    new_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    old_index = json.loads(index.read_text())
    assert new_index["weight_map"] == old_index["weight_map"]
    assert new_index["metadata"]["total_size"] == 123 and new_index["metadata"]["transposable.pattern"] == "2:4"
    converted = {}
    for shard in sorted(set(new_index["weight_map"].values())):
        converted.update(load_file(tmp_path / "out" / shard))
    check_converted(dict(original), {n: converted[n] for n in original}, "2:4", True, CONVERTED)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["model.safetensors.index.json", *set(new_index["weight_map"].values())])


def test_selection_rules(tmp_path):
    save_file(state(), tmp_path / "m.safetensors")
    report = convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors", "2:4",
                                include=["*embed*", "fc.*"], exclude=["fc.bias"])
    statuses = {t.name: t.status for t in report.tensors}
    assert statuses["embed.weight"] == "converted"  # named by include: default exclusion lifted
    assert statuses["fc.weight"] == "converted"
    assert statuses["conv.weight"] == "skipped: not included"
    assert statuses["fc.bias"] == "skipped: 1-D"
    report = convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o2.safetensors", "2:4", exclude=["conv*"])
    statuses = {t.name: t.status for t in report.tensors}
    assert statuses["conv.weight"] == "skipped: excluded by conv*"
    assert statuses["head.weight"] == "converted"  # row-wise only needs 'in' to tile
    report = convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o3.safetensors", "2:4", transposable=True)
    assert {t.name: t.status for t in report.tensors}["head.weight"].startswith(
        "left dense: weight dimension 'out' (axis 0) has size 10")
    save_file({"empty.weight": torch.ones(0, 8), "fc.weight": torch.ones(8, 8)}, tmp_path / "e.safetensors")
    report = convert_checkpoint(tmp_path / "e.safetensors", tmp_path / "e_out.safetensors", "2:4")
    assert {t.name: t.status for t in report.tensors}["empty.weight"] == "skipped: empty"
    assert load_file(tmp_path / "e_out.safetensors")["empty.weight"].shape == (0, 8)
    torch.save({"w": torch.ones(8, 8, dtype=torch.int64)}, tmp_path / "ints.pt")
    report = convert_checkpoint(tmp_path / "ints.pt", tmp_path / "ints_out.pt", "2:4")
    assert report.tensors[0].status == "skipped: not floating point"


def test_report_numbers(tmp_path):
    weight = torch.tensor([[4.0, 0.0, 2.0, 1.0], [0.0, 0.0, 3.0, 5.0]])
    save_file({"w.weight": weight}, tmp_path / "m.safetensors")
    report = convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors", "2:4")
    (entry,) = report.tensors
    assert entry.density == pytest.approx(5 / 8)
    assert entry.kept_l1 == pytest.approx(14 / 15)  # keeps 4, 2 | 3, 5
    assert entry.nonzeros_kept == pytest.approx(4 / 5)
    summary = json.loads(report.to_json())["summary"]
    assert summary["converted"] == 1 and summary["kept_l1"] == pytest.approx(14 / 15)


# ---- safety ---------------------------------------------------------------------------

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_convert_writes_output_and_json_report(capsys, tmp_path):
    save_file(state(), tmp_path / "m.safetensors")
    code, out, err = run(capsys, "convert", tmp_path / "m.safetensors", "-o", tmp_path / "o.safetensors",
                         "--pattern", "2:4", "--transposable", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "converted 2 of 9 tensors" in out and "left dense" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pattern"] == "2:4" and report["transposable"] is True
    assert {t["name"] for t in report["tensors"] if t["status"] == "converted"} == CONVERTED


@pytest.mark.parametrize("case,match", [
    ("same", "is an input file; inputs are never overwritten"),
    ("exists", "exists; pass --force"),
    ("kind", "must be of the input's kind"),
    ("truncated", "is truncated"),
    ("corrupt", "corrupt safetensors header"),
    ("missing_shard", "shard '.*model-00002-of-00002.safetensors' listed in '.*' is missing"),
    ("collision", "tensor 'fc.weight' is in two shards"),
    ("bad_index", "is not a safetensors index"),
    ("shard_overwrite", "is an input file"),
    ("pickle", r"holds Python objects other than tensors \(found pathlib.PosixPath\), refused"),
    ("directory", "is a directory"),
    ("missing", "no such file"),
    ("method", r"method 'greedy' is a transposable solver"),
    ("npy", r"is a .npy array, not a checkpoint"),
])
def test_cli_convert_errors_are_one_line_and_write_nothing(capsys, tmp_path, case, match):
    src = tmp_path / "in"
    src.mkdir()
    save_file(state(), src / "m.safetensors")
    out = tmp_path / "o.safetensors"
    args = [src / "m.safetensors", "-o", out]
    if case == "same":
        args = [src / "m.safetensors", "-o", src / "m.safetensors", "--force"]
    elif case == "exists":
        out.write_bytes(b"keep")
    elif case == "kind":
        args = [src / "m.safetensors", "-o", tmp_path / "o.pt"]
    elif case == "truncated":
        data = (src / "m.safetensors").read_bytes()
        (src / "m.safetensors").write_bytes(data[: len(data) - 100])
    elif case == "corrupt":
        (src / "m.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif case in ("missing_shard", "collision", "bad_index", "shard_overwrite"):
        _, index = make_sharded(src)
        args = [index, "-o", tmp_path / "model.safetensors.index.json"]
        if case == "missing_shard":
            (src / "model-00002-of-00002.safetensors").unlink()
        elif case == "collision":  # fc.weight (in shard 2) also stored in shard 1
            first = load_file(src / "model-00001-of-00002.safetensors")
            save_file({**first, "fc.weight": torch.ones(32, 16)}, src / "model-00001-of-00002.safetensors")
        elif case == "bad_index":
            index.write_text(json.dumps({"weights": {}}))
        else:  # writing the new index beside the old shards would overwrite them
            args = [index, "-o", src / "new.safetensors.index.json", "--force"]
    elif case == "pickle":
        torch.save({"w": torch.ones(4, 4), "path": os.sep and __import__("pathlib").Path("/")}, src / "bad.pt")
        args = [src / "bad.pt", "-o", tmp_path / "o.pt"]
    elif case == "directory":
        (src / "d.safetensors").mkdir()
        args = [src / "d.safetensors", "-o", out]
    elif case == "missing":
        args = [src / "nope.safetensors", "-o", out]
    elif case == "method":
        args += ["--method", "greedy"]
    elif case == "npy":
        import numpy as np

        np.save(src / "w.npy", np.ones((4, 4), dtype=np.float32))
        args = [src / "w.npy", "-o", tmp_path / "o.npy"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = run(capsys, "convert", *args, "--pattern", "2:4")
    assert code == 1 and err.count("\n") == 1 and err.startswith("transposable convert: error: "), err
    assert re.search(match, err), err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed, no temporary left


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "sharded"])
def test_failure_injected_mid_write_leaves_no_output(tmp_path, monkeypatch, fmt):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    if fmt == "sharded":
        _, source = make_sharded(tmp_path / "in")
        output = tmp_path / "out" / "model.safetensors.index.json"
    else:
        source = tmp_path / "in" / f"m.{fmt}"
        (torch.save if fmt == "pt" else save_file)(state(), source)
        output = tmp_path / "out" / f"m.{fmt}"
    calls = []
    real = tconvert.mask

    def failing(*args, **kwargs):  # the second converted tensor fails, after the first was written
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(tconvert, "mask", failing)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(source, output, "2:4", transposable=True)
    assert len(calls) == 2
    assert os.listdir(tmp_path / "out") == []


def test_ctrl_c_leaves_no_output(capsys, tmp_path, monkeypatch):
    save_file(state(), tmp_path / "m.safetensors")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tconvert, "mask", interrupted)
    code, _, err = run(capsys, "convert", tmp_path / "m.safetensors", "-o", tmp_path / "o.safetensors",
                       "--pattern", "2:4")
    assert code == 130 and "no output was written" in err
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_force_replaces_an_existing_output(tmp_path):
    save_file(state(), tmp_path / "m.safetensors")
    (tmp_path / "o.safetensors").write_bytes(b"old")
    convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors", "2:4", force=True)
    assert "fc.weight" in load_file(tmp_path / "o.safetensors")


# ---- AdaPrune -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_digits():
    """The digits MLP trained once for this module: (state dict, images, labels)."""
    from transposable.demo import make_model, train

    torch.manual_seed(0)
    x, y = load_digits()
    return train(make_model(), x[:1200], y[:1200], steps=150).state_dict(), x, y


@pytest.fixture
def trained_digits_model(trained_digits):
    """A fresh copy of the trained digits MLP, to be changed by one test."""
    from transposable.demo import make_model

    state, x, y = trained_digits
    model = make_model()
    model.load_state_dict(state)
    return model, x, y


def test_adaprune_lowers_layer_error_against_magnitude_masks(trained_digits_model):
    model, x, y = trained_digits_model
    calibration = [x[:100]]
    report = []
    adaprune(model, calibration, "2:4", transposable=True, report=report, recalibrate_batchnorm=False)
    assert [(r.name, r.status) for r in report] == [
        ("0", "pruned"), ("3", "pruned"),
        ("6", "left dense: weight dimension 'out' (axis 0) has size 10, not a multiple of m=4")]
    for layer in report[:2]:
        assert layer.error < layer.error_masked  # fitting lowers the output error of the same mask
    for name in ("0", "3"):
        weight = model.get_submodule(name).weight
        assert tp.is_transposable_nm(weight, "2:4")
        assert (weight != 0).sum() <= weight.numel() // 2


def test_adaprune_beats_magnitude_on_accuracy(trained_digits):
    from transposable.demo import accuracy, make_model

    state, x, y = trained_digits
    model, magnitude = make_model(), make_model()
    model.load_state_dict(state)
    magnitude.load_state_dict(state)
    with torch.no_grad():
        for name in ("0", "3"):
            layer = magnitude.get_submodule(name)
            layer.weight.mul_(tp.transposable_mask(layer.weight, "2:4"))
    recalibrate_batch_norm(magnitude, [x[:100]])
    adaprune(model, [x[:100]], "2:4")
    assert accuracy(model, x[1200:], y[1200:]) >= accuracy(magnitude, x[1200:], y[1200:])


def test_adaprune_on_conv_layers_and_batch_norm_recalibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
    data = [torch.randn(16, 4, 6, 6)]
    report = []
    adaprune(model, data, "2:4", report=report, steps=50)
    assert [(r.name, r.status) for r in report] == [("0", "pruned"), ("3", "pruned")]
    for layer in (model[0], model[3]):  # every kernel tap is 2:4 transposable
        assert tp.is_transposable_nm(layer.weight, "2:4")
    assert all(r.error < r.error_masked for r in report)
    with torch.no_grad():
        features = model[0](data[0])
    assert torch.allclose(model[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)


def test_adaprune_errors():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    with pytest.raises(ValueError, match="calibration holds no batches"):
        adaprune(model, [], "2:4")
    with pytest.raises(ValueError, match=r"layer '1' is ReLU; prunable layers are Linear"):
        adaprune(model, [torch.randn(4, 8)], "2:4", layers=["1"])
    with pytest.raises(ValueError, match=r"layer 'nope' is missing"):
        adaprune(model, [torch.randn(4, 8)], "2:4", layers=["nope"])
    with pytest.raises(ValueError, match=r"layer '2' has weight shape \(6, 8\), which does not tile at 2:4"):
        adaprune(model, [torch.randn(4, 8)], "2:4", layers=["2"])


def test_demo_prints_the_accuracy_table(capsys, tmp_path):
    from test_readme import printed_table, readme_table

    code, out, err = run(capsys, "demo", "--keep", tmp_path)
    assert code == 0, err
    assert printed_table(out) == readme_table("`transposable demo` trains an MLP")  # the README is true
    rows = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in out.splitlines()
            if line.startswith("| ") and "test accuracy" not in line}
    assert len(rows) == 4
    magnitude = next(v for k, v in rows.items() if "magnitude (convert)" in k)
    fitted = next(v for k, v in rows.items() if "AdaPrune" in k)
    assert fitted > magnitude
    assert (tmp_path / "digits_mlp_unstructured.safetensors").exists()
    assert (tmp_path / "digits_mlp_24_transposable.safetensors").exists()
