"""The GPU benchmarks' code runs on the CPU too (small), so that a GPU session only has to
measure: the suite says why it does nothing without CUDA, the mask and training-step
benchmarks run end to end and check what they measure."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallbacks; GPUs run the real thing")


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_without_cuda_says_so_and_runs_nothing(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "gpu_suite.py: no CUDA device here, nothing was run; run it on a machine with an NVIDIA GPU"]
    assert not (tmp_path / "out").exists()


def test_gemm_benchmark_without_cuda_says_so(capsys):
    assert load("bench_gemm").main([]) is None
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_mask_benchmark_runs_on_the_cpu(capsys):
    rows = load("bench_gpu_masks").main(["--size", "64", "--repeat", "1"])
    assert {(r["dtype"], r["pattern"], r["method"]) for r in rows} == {
        (dtype, pattern, method) for dtype in ("float32", "bfloat16") for pattern, method in load("bench_gpu_masks").CASES}
    for row in rows:
        assert row["seconds"] > 0
        if row["method"] == "greedy":
            assert 0.5 <= row["ratio_to_optimum"] <= 1 + 1e-9
        else:
            assert row["ratio_to_optimum"] == pytest.approx(1.0, abs=1e-9)


def test_mask_benchmark_runs_small_and_reports_every_method(capsys):
    result = load("bench_masks").main(["--shapes", "64", "--patterns", "2:4", "4:8", "--repeat", "1", "--sample", "5",
                                       "--scaling", "64", "128", "--first-calls", "exhaustive",
                                       "--memory", "rowwise:2:4", "greedy:4:8"])
    table = result["tables"]["4:8", 64]
    assert {"row-wise torch.topk (baseline)", "row-wise nm_mask (baseline 2)", "greedy", "cyclecanceling",
            "mincostflow"} <= set(table)
    assert table["cyclecanceling"]["quality"] == 1.0 and table["greedy"]["quality"] <= 1.0
    assert all(run[0] > 0 for run in result["first_calls"]["exhaustive"])  # CPU seconds, cold then warm
    assert set(result["memory"]) == {("rowwise", "2:4"), ("greedy", "4:8")}
    out = capsys.readouterr().out
    assert "first call of exhaustive, empty cache" in out and "linear scaling" in out


def test_training_step_benchmark_runs_on_the_cpu_and_refreshes():
    result = load("bench_train_step").main(["--hidden", "32", "--layers", "1", "--heads", "2", "--seq", "16",
                                            "--batch", "2", "--vocab", "50", "--steps", "40", "--warmup", "1"])
    assert result["sparse_layers"] == 4  # qkv, proj, up, down; the head and embedding stay dense
    assert result["layers_on_sparse_kernels"] == 0  # no CUDA
    assert result["refreshes"] == 1  # step 40 of 41
    assert result["dense_tokens_per_s"] > 0 and result["sparse_tokens_per_s"] > 0
    assert result["backward_mask_tokens_per_s"] > 0 and result["backward_mask_layers_on_sparse_kernels"] == 0


def test_large_prune_benchmark_writes_a_streamable_model_and_measures_it(tmp_path):
    pytest.importorskip("transformers")
    bench = load("bench_prune_large")
    result = bench.main(["--preset", "tiny", "--windows", "2", "--seqlen", "32", "--workdir", str(tmp_path)])
    assert len(result["seconds_per_block"]) == 2 and result["peak_rss_above_baseline"] > 0
    shape, vocab = bench.PRESETS["tiny"], result["vocab"]
    assert result["bfloat16_bytes"] == sum(f.stat().st_size for f in (tmp_path / "llama-tiny-2").glob("*.safetensors")) \
        - sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in (tmp_path / "llama-tiny-2").glob("*.safetensors"))
    assert result["estimate"]["ram"] >= 4 * vocab * shape["hidden"]  # at least the float32 embedding


def test_gpu_suite_default_parts_fit_one_device_call_gpu_path_first():
    suite = load("gpu_suite")
    default = [(name, limit) for name, _, limit, run in suite.PARTS if run]
    assert sum(limit for _, limit in default) <= suite.BUDGET <= 600
    assert [name for name, _ in default][:2] == ["cuda_tests", "gemm"]  # the CUDA tests, then layer fwd+bwd
    assert {"prune_stream"} <= {name for name, _, _, run in suite.PARTS if not run}


def test_gpu_suite_names_a_transformers_older_than_setup_cfg_asks():
    suite = load("gpu_suite")
    wanted = ".".join(map(str, suite.transformers_wanted()))
    assert suite.transformers_note(wanted) is None and suite.transformers_note("99.0.0") is None
    assert suite.transformers_note("4.57.1") == (f"transformers 4.57.1 is older than the {wanted} setup.cfg asks for: "
                                                "a part that loads models may fail for that reason alone")
    assert "not installed" in suite.transformers_note(None)


def test_gemm_benchmark_shapes_are_parsed_with_a_clear_error():
    import argparse

    bench = load("bench_gemm")
    assert bench.shape("8192x4096X11008") == (8192, 4096, 11008)
    with pytest.raises(argparse.ArgumentTypeError, match="TOKENSxINxOUT, e.g. 8192x4096x4096, got '4096x4096'"):
        bench.shape("4096x4096")
