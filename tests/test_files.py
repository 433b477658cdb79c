"""The file layer on real files and real failures: a full disk (a private tmpfs), signals
sent to the running command, two runs racing for one output, malformed and exotic
safetensors, byte order, pickles, and what the command imports."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import transposable as tp
import transposable.cli
import transposable.convert as tconvert
import transposable.masks
from checks import assert_valid_mask
from transposable.cli import main
from transposable.formats.safetensors_file import header_bytes, read_header
from transposable.io import atomic_directory, atomic_outputs

CLI = [sys.executable, "-m", "transposable"]
CONSOLE_SCRIPT = Path(sys.executable).parent / "transposable"  # what a user runs


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files_in(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))


def private_mounts_available():
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_private_mounts = pytest.mark.skipif(not private_mounts_available(),
                                          reason="needs unshare -rm (user and mount namespaces)")


# ---- a full disk ---------------------------------------------------------------------------

@needs_private_mounts
@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".pt"])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, suffix):
    weight = torch.randn(512, 512)
    source = tmp_path / f"w{suffix}"
    {".npy": lambda: np.save(source, weight.numpy()), ".safetensors": lambda: save_file({"w": weight}, source),
     ".pt": lambda: torch.save({"w": weight}, source)}[suffix]()
    disk = tmp_path / "disk"
    disk.mkdir()
    output = disk / f"mask{suffix}"
    key = [] if suffix == ".npy" else ["--key", "w"]
    command = " ".join([*CLI, "solve", str(source), *key, "--pattern", "2:4", "-o", str(output)])
    # A 64 KiB tmpfs in a private mount namespace: the 256 KiB mask cannot fit.
    script = f"mount -t tmpfs -o size=64k tmpfs {disk} && {command}; echo rc=$?; ls -A {disk}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "rc=1", result.stdout + result.stderr
    assert "wrote" not in result.stdout
    assert result.stderr == (f"transposable solve: error: [Errno 28] cannot write '{output}': "
                             f"No space left on device\n")


# ---- outputs checked before work, written atomically, never clobbered ----------------------

@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    torch.manual_seed(0)
    save_file({"fc.weight": torch.randn(16, 16), "fc.bias": torch.zeros(16)}, folder / "m.safetensors")
    return folder / "m.safetensors"


@pytest.fixture
def mask_calls(monkeypatch):
    """Counts calls of the one mask entry point (the real one still runs)."""
    calls = []
    real = transposable.masks.mask

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transposable.masks, "mask", counted)
    monkeypatch.setattr(tconvert, "mask", counted)
    return calls


@pytest.mark.parametrize("case,match", [
    ("report_dir", r"output directory '.*nowhere' does not exist"),
    ("report_suffix", r"--report '.*r.txt' must end in .json"),
    ("exists", r"output '.*o.safetensors' exists; pass --force"),
    ("report_exists", r"output '.*r.json' exists; pass --force"),
    ("output_dir", r"output directory '.*nowhere' does not exist"),
    ("output_is_dir", r"output '.*d.safetensors' is a directory"),
])
def test_convert_checks_every_output_before_any_work(capsys, tmp_path, checkpoint, mask_calls, case, match):
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    if case == "report_dir":
        report = tmp_path / "nowhere" / "r.json"
    elif case == "report_suffix":
        report = tmp_path / "r.txt"
    elif case == "exists":
        out.write_bytes(b"keep")
    elif case == "report_exists":
        report.write_text("keep")
    elif case == "output_dir":
        out = tmp_path / "nowhere" / "o.safetensors"
    else:
        out = tmp_path / "d.safetensors"
        out.mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = run(capsys, "convert", checkpoint, "-o", out, "--pattern", "2:4", "--transposable",
                       "--report", report)
    assert code == 1 and err.count("\n") == 1, err
    assert __import__("re").search(match, err), err
    assert mask_calls == []  # refused before a single mask was solved
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_solve_checks_its_output_before_reading_or_solving(capsys, tmp_path, checkpoint, mask_calls):
    out = tmp_path / "m.npy"
    out.write_bytes(b"keep")
    code, _, err = run(capsys, "solve", checkpoint, "--key", "fc.weight", "--pattern", "2:4", "-o", out)
    assert code == 1 and "exists; pass --force" in err and mask_calls == []
    assert out.read_bytes() == b"keep"


def test_convert_writes_checkpoint_and_report_together(capsys, tmp_path, checkpoint):
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    code, stdout, err = run(capsys, "convert", checkpoint, "-o", out, "--pattern", "2:4", "--report", report)
    assert code == 0, err
    assert f"wrote {out} and {report}" in stdout
    assert json.loads(report.read_text())["summary"]["converted"] == 1
    assert tp.is_nm_sparse(load_file(out)["fc.weight"], "2:4")


def test_a_target_that_appears_meanwhile_is_never_replaced(tmp_path):
    first, second = tmp_path / "model-1.safetensors", tmp_path / "model-2.safetensors"
    with pytest.raises(FileExistsError, match="appeared while this run was writing it"):
        with atomic_outputs([first, second]) as temporaries:
            for tmp in temporaries.values():
                Path(tmp).write_text("ours")
            second.write_text("another run's")  # another run finished first
    assert second.read_text() == "another run's"
    assert files_in(tmp_path) == ["model-2.safetensors"]  # ours rolled back, no temporaries
    with atomic_outputs([first, second], force=True) as temporaries:  # force replaces
        for tmp in temporaries.values():
            Path(tmp).write_text("ours")
    assert first.read_text() == second.read_text() == "ours"


def big_checkpoint(path, tensors=24, side=1024):
    torch.manual_seed(0)
    save_file({f"layer{i}.weight": torch.randn(side, side) for i in range(tensors)}, path)
    return path


def test_two_runs_racing_for_one_output_never_both_write_it(tmp_path):
    source = big_checkpoint(tmp_path / "m.safetensors", tensors=8, side=512)
    out = tmp_path / "out.safetensors"
    runs = [subprocess.Popen([*CLI, "convert", source, "-o", out, "--pattern", "2:4"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    (err,) = [err for code, err in results if code == 1]
    assert err.count("\n") == 1 and ("exists; pass --force" in err or "appeared while" in err), err
    assert files_in(tmp_path) == ["m.safetensors", "out.safetensors"]
    assert all(tp.is_nm_sparse(t, "2:4") for t in load_file(out).values())


def wait_for_partial(folder, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.endswith(".partial") for p in folder.iterdir()):
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.005)
    raise AssertionError("the conversion never started writing")


def conversion_caught_writing(tmp_path):
    """A ``transposable convert`` process, returned once its output's temporary exists."""
    source = big_checkpoint(tmp_path / "m.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen([*CLI, "convert", source, "-o", out_dir / "o.safetensors", "--pattern", "2:4"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_partial(out_dir, process)
    return process, source, out_dir


def test_sigterm_removes_the_partial_output_and_says_so(tmp_path):
    process, _, out_dir = conversion_caught_writing(tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert process.stderr.read() == "transposable convert: terminated; no output was written\n"
    assert files_in(out_dir) == []


def interrupted_at_every_step(write, folder):
    """Run ``write(target_folder)`` once for each step it takes in ``transposable.io`` (a call,
    a built-in's call and its return), with KeyboardInterrupt raised at that step, as a
    signal's handler raises it; yield each interrupted run's folder, then the folder of a run
    that completed. (Not at a Python function's return: raised there, it would end a
    generator at its ``yield`` without running its handlers, which no signal can do.)"""
    io_file = sys.modules["transposable.io"].__file__
    step = 0
    while True:
        step += 1
        target, seen = folder / f"run{step}", 0
        target.mkdir()

        def interrupt_at_step(frame, event, arg):
            nonlocal seen
            if frame.f_code.co_filename == io_file and event != "return":
                seen += 1
                if seen == step:
                    raise KeyboardInterrupt

        sys.setprofile(interrupt_at_step)
        try:
            write(target)
            completed = True
        except KeyboardInterrupt:  # dropped here, as the command drops it: what it held is freed
            completed = False
        finally:
            sys.setprofile(None)
        yield target
        if completed:
            return


def test_an_interrupt_at_any_step_leaves_all_the_outputs_or_none(tmp_path):
    def write(folder):
        with atomic_outputs([folder / "model.safetensors", folder / "report.json"]) as temporaries:
            for tmp in temporaries.values():
                Path(tmp).write_text("ours")

    runs = list(interrupted_at_every_step(write, tmp_path))
    assert len(runs) > 50
    *interrupted, completed = runs
    outputs = ["model.safetensors", "report.json"]
    assert files_in(completed) == outputs
    assert {run.name: files_in(run) for run in interrupted if files_in(run) not in ([], outputs)} == {}
    assert all((run / name).read_text() == "ours" for run in interrupted if files_in(run) for name in outputs)


def test_an_interrupt_at_any_step_leaves_the_directory_whole_or_untouched(tmp_path):
    def write(folder):
        (folder / "model").mkdir()
        (folder / "model" / "old.json").write_text("the original")
        with atomic_directory(folder / "model", force=True) as temporary:
            (temporary / "new.json").write_text("ours")

    runs = list(interrupted_at_every_step(write, tmp_path))
    assert len(runs) > 15
    *interrupted, completed = runs
    assert files_in(completed) == ["model", "model/new.json"]
    assert {run.name: files_in(run) for run in interrupted
            if files_in(run) not in (["model", "model/old.json"], ["model", "model/new.json"])} == {}
    assert all((run / "model" / "old.json").read_text() == "the original" for run in interrupted
               if (run / "model" / "old.json").exists())


def test_the_next_run_removes_what_a_killed_run_left(tmp_path):
    process, source, out_dir = conversion_caught_writing(tmp_path)
    process.kill()  # SIGKILL: nothing can clean up
    process.wait(timeout=60)
    (left,) = files_in(out_dir)
    assert left.startswith(".o.safetensors.") and left.endswith(".partial")
    unrelated = out_dir / ".o.safetensors.otherhost.1.x.partial"  # another machine's run on a shared disk
    unrelated.write_text("")
    result = subprocess.run([*CLI, "convert", source, "-o", out_dir / "o.safetensors", "--pattern", "2:4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert files_in(out_dir) == [unrelated.name, "o.safetensors"]


# ---- malformed and exotic safetensors -------------------------------------------------------

def raw_safetensors(path, header, data=b""):
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + data)
    return path


W = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header,match", [
    ([], "a JSON list where an object of tensors belongs"),
    ({"w": {"dtype": "F32", "shape": [2, 2]}}, "tensor 'w' has no data_offsets"),
    ({"w": "hello"}, "tensor 'w' is a JSON str, not an object"),
    ({"w": {**W, "dtype": "F33"}}, "tensor 'w' has an unknown dtype 'F33'"),
    ({"w": {**W, "shape": "2x2"}}, "tensor 'w' has a shape that is not a list of sizes: '2x2'"),
    ({"w": {**W, "shape": [2, -2]}}, "tensor 'w' has a shape that is not a list of sizes"),
    ({"w": {**W, "data_offsets": [0]}}, "tensor 'w' has data_offsets that are not two byte positions"),
    ({"__metadata__": {"a": 1}, "w": W}, "__metadata__ must map names to strings"),
    ({"w": {**W, "data_offsets": [0, 12]}}, r"tensor 'w' \(F32, shape \[2, 2\]\) does not fit its data_offsets"),
])
@pytest.mark.parametrize("command", ["convert", "solve"])
def test_malformed_safetensors_headers_are_one_line(capsys, tmp_path, header, match, command):
    source = raw_safetensors(tmp_path / "m.safetensors", header, bytes(16))
    out = tmp_path / ("o.safetensors" if command == "convert" else "o.npy")
    args = [source, "-o", out, "--pattern", "2:4"] + (["--key", "w"] if command == "solve" else [])
    code, _, err = run(capsys, command, *args)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"'{source}' " in err and __import__("re").search(match, err), err
    assert files_in(tmp_path) == ["m.safetensors"]


def test_exotic_dtypes_are_copied_byte_for_byte(tmp_path):
    rng = np.random.default_rng(0)
    extras = {"c64": ("C64", [3, 2], 48), "e8m0": ("F8_E8M0", [5], 5), "f4": ("F4", [4, 6], 12),
              "f6": ("F6_E2M3", [4, 4], 12), "u16": ("U16", [3], 6)}
    weight = rng.standard_normal((8, 8)).astype(np.float32)
    header, data, offset = {}, b"", 0
    for name, (dtype, shape, size) in extras.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        data += rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        offset += size
    header["fc.weight"] = {"dtype": "F32", "shape": [8, 8], "data_offsets": [offset, offset + 256]}
    data += weight.tobytes()
    source = tmp_path / "m.safetensors"
    source.write_bytes(header_bytes(header, {}) + data)
    report = tconvert.convert_checkpoint(source, tmp_path / "o.safetensors", "2:4", transposable=True)
    assert {t.name: t.status for t in report.tensors}["fc.weight"] == "converted"
    tensors, _, start = read_header(tmp_path / "o.safetensors")
    raw = (tmp_path / "o.safetensors").read_bytes()
    for name, (dtype, shape, size) in extras.items():
        begin, end = tensors[name]["data_offsets"]
        old_begin, old_end = header[name]["data_offsets"]
        assert raw[start + begin:start + end] == data[old_begin:old_end]
        assert tensors[name]["dtype"] == dtype and tensors[name]["shape"] == shape
    begin, end = tensors["fc.weight"]["data_offsets"]
    converted = np.frombuffer(raw[start + begin:start + end], dtype=np.float32).reshape(8, 8)
    assert (converted == np.where(tp.transposable_mask(weight, "2:4"), weight, 0)).all()


# ---- inputs a new user has -------------------------------------------------------------------

def test_big_endian_npy_is_solved_like_the_native_one(capsys, tmp_path):
    weight = np.random.default_rng(0).standard_normal((8, 12))
    np.save(tmp_path / "be.npy", weight.astype(">f4"))
    code, _, err = run(capsys, "solve", tmp_path / "be.npy", "--pattern", "2:4", "--transposable", "--pad",
                       "-o", tmp_path / "m.npy")
    assert code == 0, err
    assert (np.load(tmp_path / "m.npy") == tp.transposable_mask(weight.astype("<f4"), "2:4", pad=True)).all()


def test_a_pickle_is_refused_in_one_short_line_naming_what_it_holds(tmp_path):
    torch.save({"weight": torch.ones(4, 4), "when": Path("/tmp")}, tmp_path / "code.pt")
    result = subprocess.run([*CLI, "solve", tmp_path / "code.pt", "--key", "weight", "--pattern", "2:4", "-o",
                             tmp_path / "m.npy"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "(found pathlib.PosixPath)" in result.stderr and "\x1b" not in result.stderr
    assert len(result.stderr) - len(str(tmp_path / "code.pt")) < 250  # torch's own text is 1,000+ characters
    assert files_in(tmp_path) == ["code.pt"]


def loaded(process, library):
    """Whether the running ``process`` has mapped a shared library named like ``library``."""
    try:
        return library in Path(f"/proc/{process.pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    np.save(tmp_path / "w.npy", np.ones((8, 8), np.float32))
    process = subprocess.Popen([CONSOLE_SCRIPT, "solve", tmp_path / "w.npy", "--pattern", "2:4", "--transposable",
                                "-o", tmp_path / "m.npy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not loaded(process, "llvmlite") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)  # until numba is being imported: start-up, inside the command
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=120)
    err = process.stderr.read()
    if "wrote" in process.stdout.read():
        pytest.skip("the command finished before the interrupt arrived")
    assert code == 130 and err == "transposable solve: interrupted; no output was written\n", err
    assert files_in(tmp_path) == ["w.npy"]


def test_demo_help_shows_a_plain_percent(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "50% unstructured" in out.replace("\n", " ") and "%%" not in out


def test_unforeseen_failures_are_still_one_line(capsys, tmp_path, monkeypatch):
    np.save(tmp_path / "w.npy", np.ones((4, 4), np.float32))

    def broken(*args, **kwargs):
        raise RuntimeError("something deep broke\nsecond line")

    monkeypatch.setattr(transposable.masks, "mask", broken)
    code, _, err = run(capsys, "solve", tmp_path / "w.npy", "--pattern", "2:4", "-o", tmp_path / "m.npy")
    assert code == 1 and err == ("transposable solve: internal error: RuntimeError: something deep broke "
                                 "(set TRANSPOSABLE_TRACEBACK=1 to see where)\n")
    assert files_in(tmp_path) == ["w.npy"]


# ---- import cost -------------------------------------------------------------------------------

def loaded_after(code):
    """The heavy modules loaded by a fresh interpreter after running ``code``."""
    probe = (f"import sys\n{code}\nprint(sorted(m for m in ('torch', 'numba', 'ortools', 'scipy') "
             f"if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def test_light_commands_import_neither_torch_nor_numba():
    assert loaded_after("import transposable") == "[]"
    assert loaded_after("from transposable.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
                        "    pass") == "[]"
    assert loaded_after("from transposable.cli import main\nmain(['diversity', '--table', '--shape', '64x64'])") == "[]"
    solved = loaded_after("import numpy as np, transposable as tp\n"
                          "tp.transposable_mask(np.ones((8, 8)), '2:4', method='greedy')")
    assert "ortools" not in solved and "numba" in solved  # OR-Tools only for method='mincostflow'


def test_an_output_folder_gets_the_mode_mkdir_would_give_it(tmp_path):
    from transposable.io import atomic_directory

    for umask in (0o022, 0o077, 0o002):
        previous = os.umask(umask)
        try:
            plain = tmp_path / f"plain-{umask:o}"
            plain.mkdir()
            with atomic_directory(tmp_path / f"written-{umask:o}") as folder:
                (folder / "config.json").write_text("{}")
        finally:
            os.umask(previous)
        mode = (tmp_path / f"written-{umask:o}").stat().st_mode & 0o777
        assert mode == plain.stat().st_mode & 0o777 == 0o777 & ~umask
