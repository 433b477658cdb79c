"""The GPU path: sparse tensor-core GEMMs against exact products (strided operands,
autocast, row-major outputs, copies), fallbacks, and masks solved on the GPU against the CPU
solvers. Every test here needs CUDA and is marked
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
from checks import assert_valid_mask, assert_valid_tiles, assert_within_rounding
from transposable.nn import MaskRefresher, export, sparsify

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: (batch shape, in, out, bias): the smallest shapes the kernels accept, rectangular both
#: ways, a 3-D input, and a real transformer size.
SHAPES = [((64,), 64, 64, False), ((128,), 256, 128, True), ((96,), 128, 512, True), ((2, 48), 256, 256, False),
          ((256,), 1024, 2816, True)]

#: Engines that solve transposable tiles on the weight's device.
TORCH_ENGINES = [name for name, engine in solvers.TRANSPOSABLE.items() if engine.ACCEPTS_TORCH]


@pytest.fixture(autouse=True)
def full_precision_reductions():
    """cuBLAS may sum float16/bfloat16 products in their own precision; the rounding bound
    of ``assert_within_rounding`` assumes float32 sums, as cuSPARSELt's."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_fp16_reduced_precision_reduction = matmul.allow_bf16_reduced_precision_reduction = False
    yield
    matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = saved


def sparse_layer(inp, out, bias, dtype, param_dtype=None):
    torch.manual_seed(0)
    return sparsify(nn.Linear(inp, out, bias=bias).cuda().to(param_dtype or dtype), "2:4", gradient="ste")


def check_layer(layer, x, dtype, autocast=False):
    """Forward and backward of ``layer`` on ``x`` against exact float64 products: the
    output within its dtype's rounding and row-major, dX and dW within theirs."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype, enabled=autocast):
        out = layer(x)
    assert out.dtype == dtype and out.is_contiguous(), (out.dtype, out.stride())
    assert layer._kernels is not None and layer._dense_reason is None  # the sparse path was taken
    grad = torch.randn_like(out)
    out.backward(grad)
    masked = (layer.weight * layer.mask).to(dtype)
    x2, g2 = x.detach().reshape(-1, x.shape[-1]).to(dtype), grad.reshape(-1, grad.shape[-1])
    assert_within_rounding(out.reshape(-1, out.shape[-1]), x2, masked, layer.bias)
    assert_within_rounding(x.grad.reshape(-1, x.shape[-1]).to(dtype), g2, masked.t())
    assert_within_rounding(layer.weight.grad.to(dtype), g2.t(), x2.t())
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,inp,out,bias", SHAPES)
def test_sparse_forward_dx_and_dw_are_the_exact_products_within_rounding(dtype, batch, inp, out, bias):
    layer = sparse_layer(inp, out, bias, dtype)
    check_layer(layer, torch.randn(*batch, inp, device="cuda", dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_weights_under_autocast_run_on_the_sparse_kernels(dtype):
    layer = sparse_layer(256, 512, True, dtype, param_dtype=torch.float32)
    check_layer(layer, torch.randn(4, 32, 256, device="cuda"), dtype, autocast=True)
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32


@pytest.mark.parametrize("make", ["column slice", "column-major", "row stride"])
def test_strided_inputs_and_an_expanded_gradient_are_read_right(make):
    """cuSPARSELt reads a non-contiguous operand as the transpose of a row-major one;
    ``y.sum().backward()`` hands backward a gradient with strides (0, 0)."""
    layer = sparse_layer(256, 128, True, torch.bfloat16)
    base = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    x = {"column slice": base[:, :256], "column-major": base[:, :256].t().contiguous().t(),
         "row stride": base[::2, :256]}[make].detach().requires_grad_(True)
    out = layer(x)
    assert out.is_contiguous()
    out.float().sum().backward()  # the gradient reaching the layer is expanded from a scalar
    masked = (layer.weight * layer.mask).to(torch.bfloat16)
    assert_within_rounding(out, x, masked, layer.bias)
    ones = torch.ones(x.shape[0], 128, device="cuda", dtype=torch.bfloat16)
    assert_within_rounding(x.grad, ones, masked.t())


def test_attention_projections_keep_the_fused_attention_kernels():
    """q, k and v from sparse layers are row-major, so SDPA takes its fused kernels, as for
    the dense model (a strided last dimension sent the sparse model to math attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    layer = sparse_layer(512, 3 * 512, False, torch.bfloat16)
    q, k, v = layer(torch.randn(2, 128, 512, device="cuda", dtype=torch.bfloat16)).view(2, 128, 3, 8, 64).unbind(2)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # no math fallback allowed
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), is_causal=True)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("param_dtype,autocast", [(torch.bfloat16, None), (torch.float32, torch.float16),
                                                  (torch.float32, torch.bfloat16)])
def test_training_steps_recompress_the_changed_weights(param_dtype, autocast):
    """Every optimizer step changes W: the compressed copies must follow it. Each step's
    forward is checked against the exact product of that step's weights (fp16 parameters
    are not trained: AdamW's eps underflows in float16 and gives NaN)."""
    dtype = autocast or param_dtype
    layer = sparse_layer(256, 256, True, dtype, param_dtype=param_dtype)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(128, 256, device="cuda", dtype=param_dtype)
    keys = set()
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=autocast is not None):
            out = layer(x)
        out.float().pow(2).mean().backward()
        optimizer.step()
        assert torch.isfinite(layer.weight).all()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=autocast is not None):
            out = layer(x)
        keys.add(layer._kernels._key)
        assert_within_rounding(out, x.to(dtype), (layer.weight * layer.mask).to(dtype), layer.bias)
    assert len(keys) == 3  # recompressed after every step


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_wise_layers_with_a_backward_mask_run_both_gemms_on_the_sparse_kernels(dtype):
    torch.manual_seed(0)
    layer = sparsify(nn.Linear(256, 512).cuda().to(dtype), "2:4", transposable=False, backward_mask=True,
                     gradient="ste")
    x = torch.randn(4, 32, 256, device="cuda", dtype=dtype, requires_grad=True)
    out = layer(x)
    assert layer._kernels is not None and layer._dense_reason is None and out.is_contiguous()
    grad = torch.randn_like(out)
    out.backward(grad)
    masked = (layer.weight * layer.mask).detach()
    backward = masked * tp.nm_mask(masked.t().float().cpu(), "2:4").t().cuda()  # the best 2:4 along the outputs
    x2, g2 = x.detach().reshape(-1, 256), grad.reshape(-1, 512)
    assert_within_rounding(out.reshape(-1, 512), x2, masked, layer.bias)
    assert_within_rounding(x.grad.reshape(-1, 256), g2, backward)
    assert_within_rounding(layer.weight.grad, g2.t(), x2)


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
    assert_within_rounding(out, x, layer.weight * layer.mask, layer.bias)


def test_forced_cutlass_runs_on_8x_and_falls_back_with_the_reason_elsewhere(caplog, monkeypatch):
    """``SparseSemiStructuredTensor._FORCE_CUTLASS`` (or a build without cuSPARSELt) means
    CUTLASS, whose 2:4 kernels run on compute capability 8.x only."""
    from torch.sparse import SparseSemiStructuredTensor

    monkeypatch.setattr(transposable.nn, "_REASONS_LOGGED", set())
    monkeypatch.setattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    layer = sparse_layer(256, 128, True, torch.float16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    with caplog.at_level(logging.INFO, logger="transposable"):
        if torch.cuda.get_device_capability()[0] == 8:
            check_layer(layer, x, torch.float16)
            assert any("2:4 GEMMs run on CUTLASS" in r.getMessage() for r in caplog.records)
        else:
            out = layer(x)
            assert layer._kernels is None and "compute capability 8.x only" in layer._dense_reason
            assert_within_rounding(out, x, layer.weight * layer.mask, layer.bias)


def test_a_model_copies_and_saves_after_a_gpu_forward(tmp_path):
    import copy

    model = nn.Sequential(sparse_layer(256, 256, True, torch.bfloat16), nn.ReLU(), sparse_layer(256, 128, True,
                                                                                              torch.bfloat16))
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    expected = model(x)
    assert model[0]._kernels._key is not None
    copied = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)  # our own file, just written
    for other in (copied, loaded):
        torch.testing.assert_close(other(x), expected)


def test_a_compressed_encoder_runs_in_eval_as_the_folded_one():
    """``export(compress=True)`` used to turn the fused encoder path back on, which cannot
    take semi-structured weights."""
    import copy

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 8, dim_feedforward=512, dropout=0.0, batch_first=True)
    encoder = sparsify(nn.TransformerEncoder(layer, num_layers=2).cuda().half(), "2:4")
    folded = export(copy.deepcopy(encoder)).eval()  # plain weights: the fused path
    compressed = export(encoder, compress=True).eval()
    assert isinstance(compressed.layers[0].linear1.weight, torch.sparse.SparseSemiStructuredTensor)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.half)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), folded(x), rtol=2e-2, atol=2e-2)


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


def test_exact_gpu_masks_stay_exact_with_tf32_on(monkeypatch):
    """Weights that differ below TF32's 10 mantissa bits: a TF32 product ties them all."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    rng = np.random.default_rng(0)
    tiles = (1 + rng.integers(0, 64, (4000, 4, 4)) * 2.0**-17).astype(np.float32)
    mask = solvers.exhaustive.solve(torch.from_numpy(tiles).cuda(), 2).cpu().numpy()
    best = solvers.exhaustive.solve(tiles, 2)  # numba, float64 sums
    kept = np.where(mask, tiles.astype(np.float64), 0).sum(axis=(1, 2))
    assert (kept == np.where(best, tiles.astype(np.float64), 0).sum(axis=(1, 2))).all()


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
