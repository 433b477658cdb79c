"""Everything the GPU has to show, in one device call: the CUDA tests, the layer GEMMs
(forward + backward against dense), the training-step benchmark and the GPU mask-solver
benchmark; with ``--parts``, also a streamed prune of a random ~1B-parameter Llama (time per
block, peak GPU memory).

Run from the repository root on a machine with a CUDA GPU (the package is imported from
the checkout; OR-Tools is not needed):

    python benchmarks/gpu_suite.py [--out DIR] [--parts cuda_tests gemm ... prune_stream]

The first lines say the device and the versions of torch, CUDA, cuSPARSELt and transformers.
Each part runs in its own process with a time limit; the default parts' limits add up to
450 s, so that they fit one device call (10 minutes) with the machine's start. Its output
goes to ``DIR/<part>.log`` as it runs, its numbers into ``DIR/gpu_suite.json`` after every
part (default ``DIR``: ``$OUT``, else ``gpu-suite-results``), and a summary table is
printed. It exits 1 if a part failed. Where no CUDA device exists it says so in one line and
exits 0 without running anything.
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

#: (part, command after the interpreter, seconds allowed, run by default); "{json}" is the
#: part's result file. The default parts come first, their limits summed 450 s.
PARTS = [
    ("cuda_tests", ["-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider", "-o",
                    "addopts="], 150, True),
    ("gemm", ["benchmarks/bench_gemm.py", "--repeat", "20", "--shapes", "8192x4096x4096", "8192x4096x11008",
              "8192x11008x4096", "--json", "{json}"], 90, True),
    ("train_step", ["benchmarks/bench_train_step.py", "--steps", "40", "--json", "{json}"], 120, True),
    ("gpu_masks", ["benchmarks/bench_gpu_masks.py", "--repeat", "3", "--json", "{json}"], 90, True),
    ("gemm_all", ["benchmarks/bench_gemm.py", "--repeat", "30", "--json", "{json}"], 240, False),
    ("prune_stream", ["benchmarks/bench_prune_large.py", "--preset", "1b", "--device", "cuda", "--score", "sparsegpt",
                      "--windows", "32", "--json", "{json}"], 240, False),
]

#: The default parts' limits summed may not exceed this: one device call is at most 600 s, and
#: a session's 900 s of device time include the machine's start and a rerun.
BUDGET = 450


def transformers_wanted():
    """The lowest transformers release ``setup.cfg`` asks for, as a tuple of ints."""
    found = re.search(r"transformers>=([\d.]+)", (ROOT / "setup.cfg").read_text())
    return tuple(int(part) for part in found.group(1).split("."))


def transformers_note(installed):
    """One line on an installed transformers (a version string, or None) that setup.cfg does
    not ask for, else None."""
    wanted = transformers_wanted()
    if installed is None:
        return "transformers is not installed: the streamed-prune test skips and prune_stream fails"
    if tuple(int(part) for part in re.findall(r"\d+", installed)[:len(wanted)]) < wanted:
        return (f"transformers {installed} is older than the {'.'.join(map(str, wanted))} setup.cfg asks for: "
                "a part that loads models may fail for that reason alone")
    return None


def versions():
    """The lines that say what ran: device, torch, CUDA, cuSPARSELt, transformers."""
    from importlib.metadata import PackageNotFoundError, version

    major, minor = torch.cuda.get_device_capability()
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else "not in this build"
    try:
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = None
    info = {"device": torch.cuda.get_device_name(), "capability": f"{major}.{minor}", "torch": torch.__version__,
            "cuda": torch.version.cuda, "cusparselt": cusparselt, "transformers": transformers}
    lines = [f"device: {info['device']} (compute capability {info['capability']}), torch {info['torch']}, "
             f"CUDA {info['cuda']}, cuSPARSELt {cusparselt}, transformers {transformers or 'not installed'}"]
    note = transformers_note(transformers)
    if note:
        lines.append(note)
    return info, lines


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
    parser.add_argument("--parts", nargs="+", choices=[part[0] for part in PARTS],
                        default=[name for name, _, _, default in PARTS if default],
                        help="default: " + ", ".join(name for name, _, _, default in PARTS if default))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite.py: no CUDA device here, nothing was run; run it on a machine with an NVIDIA GPU")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info, lines = versions()
    results = {**info, "parts": {}}
    print("\n".join(lines), flush=True)
    (out / "gpu_suite.json").write_text(json.dumps(results, indent=2))
    with tempfile.TemporaryDirectory() as scratch:
        for name, command, limit, _ in PARTS:
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
