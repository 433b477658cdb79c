"""Everything the GPU has to show, in one run: the CUDA tests, the GEMM benchmark, the
training-step benchmark, the GPU mask-solver benchmark and a streamed prune of a random
~1B-parameter Llama (time per block, peak GPU memory).

Run from the repository root on a machine with a CUDA GPU (the package is imported from
the checkout; OR-Tools is not needed):

    python benchmarks/gpu_suite.py [--out DIR]

Each part runs in its own process with a time limit; its output goes to ``DIR/<part>.log``
and its numbers into ``DIR/gpu_suite.json`` (default ``DIR``: ``$OUT``, else
``gpu-suite-results``), and a summary table is printed. It exits 1 if a part failed. Where
no CUDA device exists it says so in one line and exits 0 without running anything.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: (part, command after the interpreter, seconds allowed); "{json}" is the part's result file.
PARTS = [
    ("cuda_tests", ["-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider", "-o",
                    "addopts="], 240),
    ("gemm", ["benchmarks/bench_gemm.py", "--repeat", "30", "--json", "{json}"], 240),
    ("train_step", ["benchmarks/bench_train_step.py", "--json", "{json}"], 300),
    ("gpu_masks", ["benchmarks/bench_gpu_masks.py", "--json", "{json}"], 300),
    ("prune_stream", ["benchmarks/bench_prune_large.py", "--preset", "1b", "--device", "cuda", "--score", "sparsegpt",
                      "--windows", "32", "--json", "{json}"], 240),
]


def run_part(name, argv, limit, out, scratch):
    result_file = Path(scratch) / f"{name}.json"
    command = [sys.executable, *[arg.replace("{json}", str(result_file)) for arg in argv]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    part = {"returncode": code, "seconds": round(time.perf_counter() - start, 1)}
    if result_file.exists():
        part["result"] = json.loads(result_file.read_text())
    if name == "cuda_tests":
        summary = (out / f"{name}.log").read_text().strip().splitlines()
        part["summary"] = summary[-1] if summary else ""
        part["counts"] = {kind: int(count) for count, kind in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                                          part["summary"])}
    return part


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-suite-results"),
                        help="folder for the logs and gpu_suite.json (default: $OUT, else gpu-suite-results)")
    parser.add_argument("--parts", nargs="+", choices=[name for name, _, _ in PARTS],
                        default=[name for name, _, _ in PARTS])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite.py: no CUDA device here, nothing was run; run it on a machine with an NVIDIA GPU")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parts": {}}
    print(f"device: {results['device']}, torch {results['torch']}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name, command, limit in PARTS:
            if name in args.parts:
                results["parts"][name] = part = run_part(name, command, limit, out, scratch)
                print(f"{name}: exit {part['returncode']} in {part['seconds']} s {part.get('summary', '')}",
                      flush=True)
                (out / "gpu_suite.json").write_text(json.dumps(results, indent=2))
    for name in results["parts"]:
        print(f"\n## {name}\n")
        print((out / f"{name}.log").read_text()[-6000:])
    failed = [name for name, part in results["parts"].items() if part["returncode"] != 0]
    print(f"\nparts failed: {', '.join(failed) or 'none'}; results in {out / 'gpu_suite.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
