"""Run a two-process distributed job many times and count runs that did not exit cleanly
(the abort at interpreter exit, "terminate called without an active exception").

Jobs: ``test`` is the DDP job of ``tests/test_nn.py`` (``tests/ddp_worker.py``);
``unsafe-exit`` and ``clean-exit`` are ``benchmarks/ddp_exit_reproducer.py``, which makes the
abort frequent, without and with ``transposable.nn.end_distributed()``. Each run is
``torchrun --standalone --nproc_per_node=2``; ``--load K`` keeps K busy processes spinning
meanwhile, as on a loaded machine. Prints one line per bad run and a summary table.

Run: python benchmarks/stress_ddp.py [--job test] [--runs 50] [--load 2]
"""
import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def spin():
    while True:
        pass


JOBS = {
    "test": [str(REPO / "tests" / "ddp_worker.py")],
    "unsafe-exit": [str(REPO / "benchmarks" / "ddp_exit_reproducer.py"), "unsafe"],
    "clean-exit": [str(REPO / "benchmarks" / "ddp_exit_reproducer.py"), "clean"],
}


def run_once(job, folder):
    out = Path(folder) / "checked"
    for rank in (0, 1):
        Path(f"{out}.{rank}").unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), *sys.path])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *job, str(out)], capture_output=True, text=True, env=env, timeout=600)
    finished = all(Path(f"{out}.{rank}").exists() for rank in (0, 1))
    return result.returncode, finished, "terminate called" in result.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--load", type=int, default=2, help="busy processes spinning during the runs")
    parser.add_argument("--job", choices=JOBS, default="test")
    args = parser.parse_args()
    import torch

    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.load)]
    for spinner in spinners:
        spinner.start()
    bad, aborts, start = 0, 0, time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as folder:
            for i in range(1, args.runs + 1):
                code, finished, aborted = run_once(JOBS[args.job], folder)
                if code != 0:
                    bad += 1
                    aborts += aborted
                    print(f"run {i}: exit {code}, work {'finished' if finished else 'NOT finished'}"
                          f"{', terminate called' if aborted else ''}", flush=True)
    finally:
        for spinner in spinners:
            spinner.terminate()
    seconds = time.perf_counter() - start
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.load} busy processes alongside")
    print("| job | runs | non-zero exits | of which 'terminate called' | seconds per run |")
    print("|---|---|---|---|---|")
    print(f"| {args.job} | {args.runs} | {bad} | {aborts} | {seconds / args.runs:.1f} |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
