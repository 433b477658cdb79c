"""The package runs where it is installed: a non-editable install into a read-only
site-packages, used by someone whose home is read-only too (a Docker image, a system or
cluster install). numba's on-disk cache is then out of reach; the solvers must still run."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from test_files import needs_private_mounts

REPO = Path(__file__).resolve().parents[1]

SOLVE = """
import numpy as np, transposable.solvers._jit as jit, transposable as tp
jit.NOTICE_AFTER = 0.01  # say "compiling" at once, whatever this machine's speed
mask = tp.transposable_mask(np.random.default_rng(0).standard_normal((8, 8)), "1:2", method="exhaustive")
print(tp.is_transposable_nm(mask, "1:2"), tp.__file__)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install`` (not editable) of a copy of the project into its own directory."""
    folder = tmp_path_factory.mktemp("install")
    source = folder / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache", ".hypothesis"))
    site = folder / "site-packages"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                             "--target", site, source], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return site


def run_read_only(site, home, environment=""):
    """Run ``SOLVE`` in a fresh process with ``site`` and ``home`` mounted read-only."""
    dependencies = sysconfig.get_paths()["purelib"]  # torch, numba, ... of this environment
    program = home.parent / "solve.py"
    program.write_text(SOLVE)
    read_only = " && ".join(f"mount --bind {p} {p} && mount -o remount,bind,ro {p} {p}" for p in (site, home))
    script = (f"{read_only} && cd {home.parent} && env -u NUMBA_CACHE_DIR -u XDG_CACHE_HOME HOME={home} "
              f"PYTHONPATH={site}:{dependencies} {environment} {sys.executable} {program}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)


def listing(*folders):
    return sorted(str(p) for folder in folders for p in Path(folder).rglob("*"))


@needs_private_mounts
def test_solves_in_memory_when_nothing_is_writable(installed, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    before = listing(installed, home)
    result = run_read_only(installed, home)
    assert result.returncode == 0, result.stderr
    verdict, module = result.stdout.split()
    assert verdict == "True" and module.startswith(str(installed))  # the installed copy, not the repo
    assert result.stderr.count("no writable cache directory for the compiled solvers") == 1
    assert "compiling solver kernels for exhaustive masks (in memory: no writable cache directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert listing(installed, home) == before  # nothing written anywhere


@needs_private_mounts
def test_caches_in_numba_cache_dir_when_the_install_is_read_only(installed, tmp_path):
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    result = run_read_only(installed, home, f"NUMBA_CACHE_DIR={cache}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "True"
    assert "no writable cache directory" not in result.stderr
    assert "compiling solver kernels for exhaustive masks (once: later runs load them" in result.stderr
    assert any(p.suffix == ".nbi" for p in cache.rglob("*"))  # numba's cache index, where it belongs
    again = run_read_only(installed, home, f"NUMBA_CACHE_DIR={cache}")
    assert again.returncode == 0, again.stderr
    assert "compiling" not in again.stderr  # loaded from the cache: nothing to announce, however slow


def test_the_readme_commands_in_a_row_leave_nothing_behind_to_shadow_the_package(tmp_path):
    """The quickstart's "Use it" (a plain install, then a solve) and then "Develop" (an
    editable reinstall) in one checkout: every new process still finds the package, the
    compiled kernels live in the user's cache, and the site-packages hold nothing of ours."""
    source, home, venv = tmp_path / "source", tmp_path / "home", tmp_path / "venv"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache", ".hypothesis"))
    home.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, numba, pip, ...
    environment = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    environment["HOME"] = str(home)

    def run(*command):
        result = subprocess.run(command, cwd=source, env=environment, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout

    install = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    solve = [venv / "bin" / "transposable", "solve", "examples/digits_mlp.safetensors", "--key", "fc2.weight",
             "--pattern", "2:4", "--transposable", "-o"]
    run(*install, ".")
    run(*solve, "first.safetensors")
    assert any(p.suffix == ".nbi" for p in (home / ".cache" / "transposable").rglob("*"))
    installed = {p.name for p in site.iterdir()}
    assert "transposable" in installed and "solvers" not in installed  # no generic top-level name of ours
    run(*install, "-e", ".")
    assert not (site / "transposable").exists()  # pip removed all of it: nothing was written there
    run(*solve, "second.safetensors")
    assert run(python, "-c", "import transposable.solvers as s; print(s.__file__)").startswith(str(source))
