"""The GPU path: sparse tensor-core GEMMs against the dense masked path, fallbacks, and
masks solved on the GPU against the CPU solvers. Every test here needs CUDA and is marked
``cuda`` (``pytest -m cuda``; ``benchmarks/gpu_suite.py`` runs them); elsewhere they skip.

This module imports nothing beyond torch, NumPy, networkx and the package, so that it runs
on a GPU machine without OR-Tools or the notebook tools.
"""
import logging

import numpy as np
import pytest
import torch
from torch import nn

from transposable import solvers
import transposable as tp
import transposable.nn
from checks import assert_valid_mask, assert_valid_tiles
from transposable.nn import MaskRefresher, sparsify

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: Within the dtype's rounding: a sparse kernel and a dense GEMM sum in different orders.
TOLERANCE = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

#: (batch shape, in, out, bias): the smallest shapes the kernels accept, rectangular both
#: ways, a 3-D input, and a real transformer size.
SHAPES = [((64,), 64, 64, False), ((128,), 256, 128, True), ((96,), 128, 512, True), ((2, 48), 256, 256, False),
          ((256,), 1024, 2816, True)]

#: Engines that solve transposable tiles on the weight's device.
TORCH_ENGINES = [name for name, engine in solvers.TRANSPOSABLE.items() if engine.ACCEPTS_TORCH]


def twins(inp, out, bias, dtype):
    """A sparsified layer and its twin forced onto the dense masked GEMMs."""
    torch.manual_seed(0)
    layer = sparsify(nn.Linear(inp, out, bias=bias).cuda().to(dtype), "2:4")
    dense = sparsify(nn.Linear(inp, out, bias=bias).cuda().to(dtype), "2:4")
    dense.load_state_dict(layer.state_dict())
    dense._sparse_kernels = lambda: None
    return layer, dense


def forward_backward(layer, x):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.float().pow(2).sum().backward()
    return out, x.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,inp,out,bias", SHAPES)
def test_sparse_forward_dx_and_dw_equal_the_dense_masked_path(dtype, batch, inp, out, bias):
    layer, dense = twins(inp, out, bias, dtype)
    x = torch.randn(*batch, inp, device="cuda", dtype=dtype)
    y, dx = forward_backward(layer, x)
    assert layer._kernels is not None, layer._dense_reason  # the sparse path was taken
    y_ref, dx_ref = forward_backward(dense, x)
    torch.testing.assert_close(y, y_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(dx, dx_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(layer.weight.grad, dense.weight.grad, **TOLERANCE[dtype])
    if bias:
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_steps_recompress_the_changed_weights(dtype):
    """Every optimizer step changes W: the compressed copies must follow it."""
    layer, dense = twins(256, 256, True, dtype)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (layer, dense)]
    x = torch.randn(128, 256, device="cuda", dtype=dtype)
    for _ in range(3):
        for model, optimizer in zip((layer, dense), optimizers):
            optimizer.zero_grad()
            model(x).float().pow(2).mean().backward()
            optimizer.step()
        torch.testing.assert_close(layer.weight, dense.weight, **TOLERANCE[dtype])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense(x), **TOLERANCE[dtype])
    assert layer._kernels is not None


@pytest.mark.parametrize("make,reason", [
    (lambda: sparsify(nn.Linear(256, 128).cuda(), "2:4"), "dtype float32"),
    (lambda: sparsify(nn.Linear(256, 128).cuda().half(), "4:8"), "pattern 4:8"),
    (lambda: sparsify(nn.Linear(256, 128).cuda().half(), "2:4", transposable=False), "row-wise"),
    (lambda: sparsify(nn.Linear(40, 72).cuda().half(), "2:4"), "shape (72, 40)"),
])
def test_layers_the_kernels_refuse_fall_back_with_one_log_line(make, reason, caplog, monkeypatch):
    monkeypatch.setattr(transposable.nn, "_REASONS_LOGGED", set())  # as in a fresh process
    layer = make()
    x = torch.randn(32, layer.in_features, device="cuda", dtype=layer.weight.dtype)
    with caplog.at_level(logging.INFO, logger="transposable"):
        for _ in range(3):
            out = layer(x)
    lines = [r.getMessage() for r in caplog.records if "dense masked GEMMs" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines
    assert layer._kernels is None
    expected = x @ (layer.weight * layer.mask).t() + layer.bias
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16)])
def test_engines_on_cuda_agree_with_the_cpu(n, m, rng):
    from checks import kept

    tiles = rng.standard_normal((2000, m, m)).astype(np.float32)
    exact = np.array([kept(tile, mask) for tile, mask in zip(tiles, solvers.cyclecanceling.solve(tiles, n))])
    for name in [e for e in TORCH_ENGINES if solvers.TRANSPOSABLE[e].supports(n, m) is None]:
        mask = solvers.TRANSPOSABLE[name].solve(torch.from_numpy(tiles).cuda(), n)
        assert mask.device.type == "cuda"
        assert_valid_tiles(mask, n)
        ours = np.where(mask.cpu().numpy(), np.abs(tiles), 0).sum(axis=(1, 2))
        if solvers.TRANSPOSABLE[name].EXACT:  # float32 sums on the GPU
            assert (ours >= exact * (1 - 1e-5)).all(), name
        else:
            assert ours.sum() >= 0.99 * exact.sum(), name


@pytest.mark.parametrize("pattern,method", [("2:4", "exhaustive"), ("4:8", "cyclecanceling"), ("8:16", "greedy"),
                                            ("2:4", "greedy")])
def test_masks_solved_on_the_gpu_match_the_cpu_solvers(pattern, method):
    torch.manual_seed(0)
    weight = torch.randn(512, 1024)
    weight[:, ::7] = 0  # zeros and ties
    weight[::5] = weight[::5].round()
    on_gpu = tp.mask(weight.cuda(), pattern, transposable=True, method=method)
    on_cpu = tp.mask(weight, pattern, transposable=True, method=method)
    assert on_gpu.device.type == "cuda"
    n, m = (int(v) for v in pattern.split(":"))
    assert_valid_mask(on_gpu.cpu().numpy(), n, m, transposable=True)
    if method == "greedy":  # the same algorithm step for step: the same mask, ties aside
        assert tp.kept_fraction(weight, on_gpu.cpu()) == pytest.approx(tp.kept_fraction(weight, on_cpu), rel=1e-6)
        assert (on_gpu.cpu() != on_cpu).float().mean() < 1e-3
    else:  # exact both: equal kept L1 (the masks may differ where tiles tie)
        assert tp.kept_fraction(weight, on_gpu.cpu()) == pytest.approx(tp.kept_fraction(weight, on_cpu), rel=1e-6)


def test_refreshes_on_the_gpu_keep_valid_masks_and_match_the_cpu():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).cuda().bfloat16(), "2:4",
                     refresh_every=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    refresher = MaskRefresher(model).attach(optimizer)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
    assert len(refresher.history) == 2
    for layer in (model[0], model[2]):
        assert layer.mask.device.type == "cuda"
        assert_valid_mask(layer.mask.cpu().numpy(), 2, 4, transposable=True)
        on_cpu = tp.mask(layer.weight.detach().float().cpu(), "2:4", transposable=True, method="greedy")
        assert tp.kept_fraction(layer.weight.float().cpu(), layer.mask.cpu()) == pytest.approx(
            tp.kept_fraction(layer.weight.float().cpu(), on_cpu), rel=1e-3)


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_streamed_pruning_on_the_gpu_equals_the_whole_model_on_the_gpu(tmp_path, score):
    """``prune_pretrained(device="cuda")``: blocks, activations and solvers on the GPU, one
    block at a time, the same tensors as the whole model on the GPU."""
    pytest.importorskip("transformers")
    from pathlib import Path

    from test_prune import tiny_llama
    from test_streaming import save_folder, tensors, word_tokenizer
    from transposable.pretrained import prune_pretrained

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    folder = save_folder(tiny_llama(), tmp_path / "model", word_tokenizer(text), "sharded")
    (tmp_path / "text.txt").write_text(text)
    written = []
    for stream in (False, True):
        out = tmp_path / f"out-{stream}"
        report = prune_pretrained(folder, out, tmp_path / "text.txt", "2:4", score=score, samples=4, seqlen=32,
                                  device="cuda", stream=stream)
        assert report["summary"]["pruned"] == 14
        written.append(tensors(out))
    for name, value in written[1].items():
        assert torch.equal(value, written[0][name]), name
        if name.endswith("proj.weight"):
            assert tp.is_transposable_nm(value, "2:4"), name
