"""`transposable solve` and the file layer, on real files: every format, every error,
no partial output."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import transposable as tp
import transposable.formats as formats
import transposable.io as tio
from checks import assert_valid_mask
from transposable.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits_mlp.safetensors"
CONSOLE_SCRIPT = Path(sys.executable).parent / "transposable"  # installed by pip beside python


@pytest.fixture
def weight():
    return torch.tensor(np.random.default_rng(3).standard_normal((16, 24)), dtype=torch.float32)


@pytest.fixture
def files(tmp_path, weight):
    paths = {
        "npy": tmp_path / "w.npy",
        "pt": tmp_path / "state.pt",
        "bare": tmp_path / "bare.pth",
        "safetensors": tmp_path / "w.safetensors",
    }
    np.save(paths["npy"], weight.numpy())
    torch.save({"model": {"fc.weight": weight, "fc.bias": torch.zeros(16)}, "epoch": 3}, paths["pt"])
    torch.save(weight, paths["bare"])
    save_file({"fc.weight": weight, "fc.bias": torch.zeros(16)}, paths["safetensors"])
    return paths


def read_mask(path, key):
    fmt = formats.format_of(path).NAME
    if fmt == "npy":
        return np.load(path)
    if fmt == "safetensors":
        return load_file(path)[key].numpy()
    obj = torch.load(path, weights_only=True)
    return (obj[key] if isinstance(obj, dict) else obj).numpy()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("source,key,suffix", [
    ("npy", None, ".npy"),
    ("pt", "model.fc.weight", ".pt"),
    ("pt", "model.fc.weight", ".npy"),
    ("bare", None, ".pth"),
    ("safetensors", "fc.weight", ".safetensors"),
    ("safetensors", "fc.weight", ".npy"),
])
@pytest.mark.parametrize("transposable", [False, True])
def test_solve_writes_the_mask_in_the_asked_format(capsys, files, weight, tmp_path, source, key, suffix, transposable):
    out = tmp_path / f"mask{suffix}"
    argv = ["solve", files[source], "--pattern", "2:4", "-o", out] + (["--key", key] if key else [])
    argv += ["--transposable"] if transposable else []
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    mask = read_mask(out, key or "mask")
    assert mask.dtype == bool and mask.shape == tuple(weight.shape)
    assert_valid_mask(mask, 2, 4, transposable=transposable)
    expected = tp.transposable_mask(weight, "2:4") if transposable else tp.nm_mask(weight, "2:4")
    assert (mask == expected.numpy()).all()
    fraction = tp.kept_fraction(weight, expected)
    for field in ["shape    (16, 24) float32", f"kept L1  {fraction:.4f}", "seconds", f"wrote    {out}",
                  "method   " + ("exhaustive" if transposable else "rowwise")]:
        assert field in stdout


def test_safetensors_output_records_pattern_and_method(capsys, files, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "solve", files["safetensors"], "--key", "fc.weight", "--pattern", "4:8",
                       "--transposable", "--method", "GREEDY", "-o", out, "--pad")
    assert code == 0, err
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta == formats.mask_metadata("4:8", True, "greedy")  # the schema convert writes too
    assert meta["transposable.version"] == tp.__version__


def test_console_script_runs_the_bundled_example(tmp_path):
    out = tmp_path / "fc2_mask.safetensors"
    result = subprocess.run([CONSOLE_SCRIPT, "solve", EXAMPLE, "--key", "fc2.weight", "--pattern", "4:8",
                             "--transposable", "-o", out], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pattern  4:8 transposable" in result.stdout
    assert_valid_mask(load_file(out)["fc2.weight"].numpy(), 4, 8, transposable=True)


def test_console_script_error_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "mask.safetensors"
    result = subprocess.run([sys.executable, "-m", "transposable", "solve", EXAMPLE, "--key", "fc2.bias",
                             "--pattern", "2:4", "-o", out], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "at least 2 dimensions" in result.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def write_bad_files(tmp_path, files):
    bad = {}
    bad["nan"] = tmp_path / "nan.npy"
    np.save(bad["nan"], np.full((4, 4), np.nan))
    bad["pickle"] = tmp_path / "code.pt"
    torch.save({"weight": torch.ones(4, 4), "when": Path("/tmp")}, bad["pickle"])
    bad["truncated"] = tmp_path / "truncated.pt"
    bad["truncated"].write_bytes(files["pt"].read_bytes()[:200])
    bad["garbage"] = tmp_path / "garbage.safetensors"
    bad["garbage"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    bad["object_npy"] = tmp_path / "objects.npy"
    np.save(bad["object_npy"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad["odd"] = tmp_path / "odd.npy"
    np.save(bad["odd"], np.ones((6, 6), dtype=np.float32))
    bad["ints"] = tmp_path / "ints.npy"
    np.save(bad["ints"], np.ones((4, 4), dtype=np.int32))
    return bad


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file: '.*nope.npy'"),
    ("directory", "is a directory"),
    ("suffix", r"cannot tell the format of '.*w.txt' from its name"),
    ("nan", r"weight holds 16 NaN or Inf"),
    ("pickle", r"holds Python objects other than tensors \(found pathlib.PosixPath\), refused: loading with "
               r"weights_only=True never runs code from a file"),
    ("truncated", r"cannot read '.*truncated.pt' as a PyTorch file"),
    ("garbage", r"'.*garbage.safetensors' has a corrupt safetensors header"),
    ("object_npy", r"cannot read '.*objects.npy' as a .npy array"),
    ("odd", r"'out' \(axis 0\) has size 6, not a multiple of m=4; pass pad=True \(--pad\)"),
    ("ints", r"float dtype .* got int32"),
    ("no_key", r"holds 2 tensors; name one with a key \(--key\): fc.bias, fc.weight"),
    ("bad_key", r"key 'fc.weigth' is not in"),
    ("close_key", r"key 'fc.weight' is not in .*did you mean model.fc.weight"),
    ("npy_key", r"holding one array; drop the key 'x'"),
    ("bare_key", r"holds a single tensor, not a dict; drop the key 'x'"),
    ("same_file", "is an input file; inputs are never overwritten"),
    ("format", r"must be .npy or .pt/.pth/.bin"),
    ("no_dir", "output directory '.*nowhere' does not exist"),
    ("method_rowwise", r"method 'greedy' is a transposable solver; row-wise masks are always exact"),
    ("pattern", r"n must satisfy 0 < n < m, got n=4, m=4"),
    ("exhaustive_8", "method 'exhaustive' cannot solve pattern 4:8"),
])
def test_errors_are_one_line_and_leave_no_output(capsys, files, tmp_path, case, match):
    bad = write_bad_files(tmp_path, files)
    out = tmp_path / "out" / "mask.npy"
    out.parent.mkdir()
    args = {
        "missing": [tmp_path / "nope.npy"],
        "directory": [tmp_path / "out.npy"],
        "suffix": [tmp_path / "w.txt"],
        "nan": [bad["nan"]], "pickle": [bad["pickle"], "--key", "weight"],
        "truncated": [bad["truncated"], "--key", "x"], "garbage": [bad["garbage"]],
        "object_npy": [bad["object_npy"]], "odd": [bad["odd"], "--transposable"], "ints": [bad["ints"]],
        "no_key": [files["safetensors"]], "bad_key": [files["safetensors"], "--key", "fc.weigth"],
        "close_key": [files["pt"], "--key", "fc.weight"],
        "npy_key": [files["npy"], "--key", "x"], "bare_key": [files["bare"], "--key", "x"],
        "same_file": [files["npy"], "-o", files["npy"]],
        "format": [files["pt"], "--key", "model.fc.weight", "-o", tmp_path / "out" / "m.safetensors"],
        "no_dir": [files["npy"], "-o", tmp_path / "nowhere" / "m.npy"],
        "method_rowwise": [files["npy"], "--method", "greedy"],
        "pattern": [files["npy"], "--pattern", "4:4"],
        "exhaustive_8": [files["npy"], "--pattern", "4:8", "--transposable", "--method", "exhaustive"],
    }[case]
    (tmp_path / "out.npy").mkdir()
    (tmp_path / "w.txt").write_text("1 2 3")
    if "--pattern" not in args:
        args = args + ["--pattern", "2:4"]
    if "-o" not in args:
        args = args + ["-o", out]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, stdout, err = run(capsys, "solve", *args)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("transposable solve: error: ")
    import re

    assert re.search(match, err), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temp left


def test_existing_output_needs_force(capsys, files, tmp_path):
    out = tmp_path / "mask.npy"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "solve", files["npy"], "--pattern", "2:4", "-o", out)
    assert code == 1 and "exists; pass --force" in err
    assert out.read_bytes() == b"keep me"
    code, _, err = run(capsys, "solve", files["npy"], "--pattern", "2:4", "-o", out, "--force")
    assert code == 0, err
    assert_valid_mask(np.load(out), 2, 4, transposable=False)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["solve", "w.npy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required: --pattern, -o/--output (see --help)" in err
    with pytest.raises(SystemExit):
        main(["solve", "w.npy", "--pattern", "2:4", "-o", "x.npy", "--transposable", "--method", "lp"])
    assert "invalid choice: 'lp'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["solve", "--help"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: transposable" in capsys.readouterr().out


def test_ctrl_c_leaves_no_output(capsys, files, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(formats.npy.np, "save", interrupted)  # interrupt in the middle of writing
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "solve", files["npy"], "--pattern", "2:4", "-o", out / "m.npy")
    assert code == 130 and "no output was written" in err
    assert os.listdir(out) == []


def test_failure_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")

    class DiskFull(OSError):
        pass

    with pytest.raises(DiskFull):
        with tio.atomic_output(out, force=True) as tmp:
            Path(tmp).write_bytes(b"half a fi")
            raise DiskFull("No space left on device")
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_write_tensors_round_trips_in_every_format(tmp_path):
    mask = torch.tensor([[True, False], [False, True]])
    for name in ["m.npy", "m.pt", "m.safetensors"]:
        formats.write_tensors(tmp_path / name, {"k": mask}, metadata={"a": "b"})
        loaded, key = formats.read_tensor(tmp_path / name, None if name.endswith(".npy") else "k")
        assert (np.asarray(loaded) == mask.numpy()).all()
    assert torch.load(tmp_path / "m.pt", weights_only=True)._metadata["transposable"] == {"a": "b"}
    with pytest.raises(ValueError, match="a .npy file holds one array, got 2 tensors"):
        formats.write_tensors(tmp_path / "two.npy", {"a": mask, "b": mask})
    assert not (tmp_path / "two.npy").exists()


def test_nested_state_dicts_are_flattened_with_dots(files):
    tensor, key = formats.read_tensor(files["pt"], "model.fc.bias")
    assert key == "model.fc.bias" and tensor.shape == (16,)
