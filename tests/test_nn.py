"""Sparse training: layers against a dense W*S reference, STE and SR-STE gradients, mask
refresh, SAD, checkpoints, export, torch.compile, DDP, the demo, and CUDA sparse GEMMs."""
import itertools
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import transposable as tp
import transposable.nn
from checks import assert_valid_mask
from transposable.cli import main
from transposable.nn import MaskRefresher, SparseLinear, export, sparse_layers, sparsify


def reference_grads(layer_fn, weight, mask, bias, x):
    """Output and gradients of a plain dense layer that multiplies W*S (W*S a leaf)."""
    masked = (weight * mask).detach().requires_grad_(True)
    bias_ref = bias.detach().clone().requires_grad_(True) if bias is not None else None
    x_ref = x.detach().clone().requires_grad_(True)
    out = layer_fn(x_ref, masked, bias_ref)
    out.pow(2).sum().backward()
    return out.detach(), x_ref.grad, masked.grad, bias_ref.grad if bias_ref is not None else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gradient", ["ste", "srste"])
@pytest.mark.parametrize("transposable", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_outputs_and_gradients_equal_a_dense_masked_reference(dtype, gradient, transposable, kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(16, 8).to(dtype)
        x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)  # leading dims are kept
        functional = F.linear
    else:
        layer = nn.Conv2d(8, 16, 3, padding=1).to(dtype)
        x = torch.randn(2, 8, 6, 6, dtype=dtype, requires_grad=True)
        functional = lambda inp, w, b: F.conv2d(inp, w, b, padding=1)  # noqa: E731
    sparsify(layer, "2:4", transposable=transposable, gradient=gradient, srste_decay=0.25)
    out = layer(x)
    out.pow(2).sum().backward()
    ref_out, ref_x_grad, ref_w_grad, ref_b_grad = reference_grads(functional, layer.weight, layer.mask, layer.bias, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(x.grad, ref_x_grad)
    decay = 0.25 * layer.weight.detach() * ~layer.mask if gradient == "srste" else 0
    torch.testing.assert_close(layer.weight.grad, ref_w_grad + decay)  # straight through, all entries
    torch.testing.assert_close(layer.bias.grad, ref_b_grad)
    assert_valid_mask(layer.mask, 2, 4, transposable=transposable)


def column_wise_best(weight, n, m):
    """Brute force: for every column and group of ``m`` output rows, the ``n`` rows keeping
    the most ``|w|`` (the first such set in lexicographic order: ties to the lowest rows)."""
    out, inp = weight.shape
    best = torch.zeros(out, inp, dtype=torch.bool)
    for j in range(inp):
        for start in range(0, out, m):
            column = weight[start:start + m, j].abs().tolist()
            rows = max(itertools.combinations(range(m), n), key=lambda kept: sum(column[r] for r in kept))
            best[[start + r for r in rows], j] = True
    return best


@pytest.mark.parametrize("values", ["random", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_backward_mask_gives_the_input_gradient_of_the_best_column_wise_weight(kind, pattern, dtype, values):
    torch.manual_seed(0)
    n, m = map(int, pattern.split(":"))
    if kind == "linear":
        layer = nn.Linear(16, 24).to(dtype)
    else:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(24, 16).to(dtype)  # weight stored (in, out)
    if values == "ties":  # small integers: many equal magnitudes, and exact sums
        with torch.no_grad():
            layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape))
    sparsify(layer, pattern, transposable=False, backward_mask=True, srste_decay=0.25)
    assert layer.backward_mask and (kind != "linear" or "backward_mask=True" in repr(layer))
    weight, keep = (layer.weight, layer.mask) if kind == "linear" else (layer.weight.t(), layer.mask.t())
    masked = (weight * keep).detach()
    x = torch.randint(-3, 4, (2, 5, 16)).to(dtype).requires_grad_(True)
    out = layer(x)
    grad_out = torch.randint(-3, 4, out.shape).to(dtype)
    out.backward(grad_out)
    torch.testing.assert_close(out, F.linear(x, masked, layer.bias))  # the forward pass keeps its row-wise mask
    backward = masked * column_wise_best(masked, n, m)
    torch.testing.assert_close(x.grad, grad_out @ backward, rtol=0, atol=0)
    assert tp.is_nm_sparse(backward.t(), n, m)  # (W*S*B)^T is N:M: what the sparse GEMM compresses
    assert not torch.equal(backward, masked)  # the two gradients differ: the test tells them apart
    grad = layer.weight.grad if kind == "linear" else layer.weight.grad.t()
    expected = grad_out.reshape(-1, 24).t() @ x.detach().reshape(-1, 16) + 0.25 * weight.detach() * ~keep
    torch.testing.assert_close(grad, expected)  # the weight gradient is unchanged


def test_backward_mask_errors_and_layers_it_cannot_tile(caplog):
    with pytest.raises(ValueError, match="backward_mask=True is for row-wise masks"):
        sparsify(nn.Linear(8, 8), "2:4", backward_mask=True)
    with pytest.raises(TypeError, match="backward_mask must be True or False, got 'yes'"):
        sparsify(nn.Linear(8, 8), "2:4", transposable=False, backward_mask="yes")
    with pytest.raises(ValueError, match=r"applies to linear layers .* '1' is a Conv2d: exclude it \(exclude=\['1'\]\)"):
        sparsify(nn.Sequential(nn.Linear(8, 8), nn.Conv2d(4, 8, 3)), "2:4", transposable=False, backward_mask=True)
    # the output features are grouped too: 6 of them do not tile at 2:4
    with caplog.at_level(logging.WARNING, logger="transposable"):
        model = sparsify(nn.Sequential(nn.Linear(8, 6), nn.Linear(8, 8)), "2:4", transposable=False,
                         backward_mask=True)
    assert [name for name, _ in sparse_layers(model)] == ["1"] and "0: weight (6, 8) does not tile" in caplog.text
    assert len(sparse_layers(sparsify(nn.Sequential(nn.Linear(8, 6)), "2:4", transposable=False))) == 1


def test_srste_on_a_hand_worked_example():
    layer = nn.Linear(4, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0]]))
        layer.bias.fill_(0.5)
    sparsify(layer, "2:4", transposable=False, srste_decay=0.5)
    assert layer.mask.tolist() == [[False, False, True, True]]  # keeps |3| and |-4|
    out = layer(torch.ones(1, 4))
    assert out.item() == 3.0 - 4.0 + 0.5
    out.sum().backward()
    # dL/dW~ = x = 1 everywhere (STE), plus 0.5 * (1 - S) * W on the pruned 1 and -2.
    assert layer.weight.grad.tolist() == [[1.5, 0.0, 1.0, 1.0]]
    assert layer.bias.grad.tolist() == [1.0]


def test_parameter_names_and_objects_are_unchanged():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(16, 8, 1))
    before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # made before sparsify
    sparsify(model, "2:4")
    assert dict(model.named_parameters()) == before
    assert isinstance(model[0], nn.Linear) and isinstance(model[0], SparseLinear)
    assert sorted(k for k in model.state_dict() if k.endswith("mask")) == ["0.mask", "2.mask"]
    model[0](torch.randn(2, 8)).sum().backward()
    optimizer.step()  # the optimizer still holds the trained parameters


def train(model, refresher, steps, seed=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    refresher.attach(optimizer)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 16, generator=generator)).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("transposable,method", [(True, "greedy"), (True, "auto"), (False, "auto")])
def test_masks_stay_valid_after_every_refresh(transposable, method):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), "2:4",
                     transposable=transposable, refresh_every=1, refresh_method=method)
    refresher = MaskRefresher(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    refresher.attach(optimizer)
    for step in range(6):
        optimizer.zero_grad()
        model(torch.randn(16, 16)).pow(2).mean().backward()
        optimizer.step()
        for _, layer in sparse_layers(model):
            assert_valid_mask(layer.mask, 2, 4, transposable=transposable)
            if not transposable:  # row-wise refreshes are exact: the best mask of the weights
                assert torch.equal(layer.mask, tp.nm_mask(layer.weight.detach(), "2:4"))
    assert [r["step"] for r in refresher.history] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "8:16"])
@pytest.mark.parametrize("make", [lambda: nn.Linear(64, 128), lambda: nn.Conv2d(32, 64, 3)])
def test_a_refresh_of_unchanged_weights_flips_nothing(pattern, make):
    # The initial masks are exact and refreshes use the greedy: without keeping the better
    # mask per tile, the first refresh flipped 2-7 % of the entries of unchanged weights.
    torch.manual_seed(0)
    model = sparsify(make(), pattern, refresh_method="greedy")
    before = model.mask.clone()
    record = MaskRefresher(model).refresh()
    assert record["total"]["flips"] == 0
    assert torch.equal(model.mask, before)


def test_a_refresh_keeps_per_tile_the_better_of_the_current_and_the_new_mask():
    torch.manual_seed(0)
    layer = sparsify(nn.Linear(64, 64, bias=False), "4:8", refresh_method="greedy")
    with torch.no_grad():
        layer.weight.add_(torch.randn(64, 64))  # training moved the weights
    current = layer.mask.clone()
    greedy = tp.mask(layer.weight.detach(), "4:8", transposable=True, method="greedy")
    MaskRefresher(layer).refresh()
    assert_valid_mask(layer.mask, 4, 8, transposable=True)
    tiles = lambda m: (layer.weight.detach().abs() * m).reshape(8, 8, 8, 8).sum(dim=(1, 3))
    kept = tiles(layer.mask)
    assert (kept >= tiles(current)).all() and (kept >= tiles(greedy)).all()
    assert (kept > tiles(current)).any()  # some tiles did improve: the refresh is not a no-op
    for a in range(8):  # and every tile is one of the two candidates
        for b in range(8):
            block = (slice(8 * a, 8 * a + 8), slice(8 * b, 8 * b + 8))
            assert torch.equal(layer.mask[block], current[block]) or torch.equal(layer.mask[block], greedy[block])


def test_refresh_schedule_defaults_follow_the_papers():
    transposable = sparsify(nn.Linear(8, 8), "2:4")
    rowwise = sparsify(nn.Linear(8, 8), "2:4", transposable=False)
    assert transposable.refresh_every == 40 and rowwise.refresh_every == 1
    refresher = MaskRefresher(transposable)
    for _ in range(80):
        refresher.step()
    assert [r["step"] for r in refresher.history] == [40, 80]


def test_sad_counts_a_scripted_mask_change():
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2, 3, 4]] * 4))
    sparsify(layer, "2:4", transposable=False)
    refresher = MaskRefresher(layer)
    with torch.no_grad():
        layer.weight[0] = torch.tensor([4.0, 3, 2, 1])  # row 0 swaps its two kept entries: 4 flips
    record = refresher.refresh()
    assert record["layers"][""] == {"flips": 4, "fraction": 4 / 16}
    assert record["total"] == {"flips": 4, "fraction": 0.25}
    assert refresher.refresh()["total"]["flips"] == 0  # nothing changed since
    table = refresher.table()
    assert "| 0 | 4 | 4 | 0.25000 |" in table and "| 0 | 0 | 0 | 0.00000 |" in table


def test_state_dict_round_trip_and_resume_reproduce_the_masks(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))  # noqa: E731
    model = sparsify(make(), "2:4", refresh_every=3)
    refresher = MaskRefresher(model)
    train(model, refresher, steps=4)
    torch.save({"model": model.state_dict(), "refresher": refresher.state_dict()}, tmp_path / "ckpt.pt")

    torch.manual_seed(1)  # different initial weights and masks
    resumed = sparsify(make(), "2:4", refresh_every=3)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_refresher = MaskRefresher(resumed)
    resumed_refresher.load_state_dict(checkpoint["refresher"])
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(resumed)):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    x = torch.randn(4, 16)
    torch.testing.assert_close(model(x), resumed(x))
    train(model, refresher, steps=5, seed=7)  # both continue identically
    train(resumed, resumed_refresher, steps=5, seed=7)
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(resumed)):
        assert torch.equal(a.mask, b.mask)
    assert refresher.history == resumed_refresher.history


def test_include_exclude_first_last_and_non_tiling_layers(caplog):
    def make():
        return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 10))

    model = sparsify(make(), "2:4", skip_first=True)
    assert [n for n, _ in sparse_layers(model)] == ["1", "2"]  # "3" has 10 outputs: does not tile
    assert [r.getMessage() for r in caplog.records] == [
        "sparsify: 1 weight left dense: 3: weight (10, 16) does not tile at 2:4 (weight dimension 'out' (axis 0) "
        "has size 10, not a multiple of m=4)"]
    assert [n for n, _ in sparse_layers(sparsify(make(), "2:4", skip_last=True, transposable=False))] == ["0", "1", "2"]
    assert [n for n, _ in sparse_layers(sparsify(make(), "2:4", include=["1", "2"], exclude=["2"]))] == ["1"]
    per_layer = sparsify(make(), "2:4", srste_decay={"1": 0.1}, skip_last=True)
    assert per_layer[1].srste_decay == 0.1 and per_layer[2].srste_decay == 2e-4
    assert sparsify(make(), "2:4", gradient="ste", skip_last=True)[1].srste_decay == 0.0


class ScaledLinear(nn.Linear):  # a subclass that keeps nn.Linear's forward
    pass


class LoggingLinear(nn.Linear):  # a subclass with a forward of its own
    def forward(self, x):
        return super().forward(x) * 2


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Linear(16, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight  # tied, as language models do

    def forward(self, tokens):
        x = self.body(self.embed(tokens))
        return self.head(self.attention(x, x, x)[0])


def test_subclasses_are_sparsified_and_export_gives_them_back():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(ScaledLinear(16, 16), nn.ReLU(), nn.Linear(16, 16)), "2:4")
    assert isinstance(model[0], SparseLinear) and isinstance(model[0], ScaledLinear)
    x = torch.randn(4, 16)
    torch.testing.assert_close(model[0](x), x @ (model[0].weight * model[0].mask).t() + model[0].bias)
    export(model)
    assert type(model[0]) is ScaledLinear and type(model[2]) is nn.Linear


def test_what_is_left_dense_is_said_once_with_the_reason(caplog):
    model = TiedLM()
    model.extra = LoggingLinear(16, 16)
    with caplog.at_level(logging.WARNING, logger="transposable"):
        sparsify(model, "2:4")
    assert [n for n, _ in sparse_layers(model)] == ["body"]
    assert len(caplog.records) == 1
    summary = caplog.records[0].getMessage()
    assert summary.startswith("sparsify: 4 weights left dense: ")
    assert "attention.out_proj: nn.MultiheadAttention uses this weight without calling the layer" in summary
    assert "attention.in_proj_weight: a parameter of nn.MultiheadAttention, not a layer's weight" in summary
    assert "head: weight shared with embed (tied); name it in include= to sparsify it anyway" in summary
    assert "extra: LoggingLinear overrides forward()" in summary
    assert model.head.weight is model.embed.weight and bool((model.embed.weight != 0).all())  # not pruned


def test_a_tied_weight_named_by_the_user_is_sparsified():
    model = sparsify(TiedLM(), "2:4", include=["head"])
    assert [n for n, _ in sparse_layers(model)] == ["head"]
    assert model.head.weight is model.embed.weight  # still one parameter


def test_a_pattern_per_layer_by_glob_and_a_filter_fn():
    def make():
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 32))

    model = sparsify(make(), {"0": "2:4", "[23]": "8:16"})
    assert [(n, str(layer.pattern)) for n, layer in sparse_layers(model)] == [("0", "2:4"), ("2", "8:16"),
                                                                             ("3", "8:16")]
    for _, layer in sparse_layers(model):
        n, m = layer.pattern.n, layer.pattern.m
        assert_valid_mask(layer.mask, n, m, transposable=True)
    assert [n for n, _ in sparse_layers(sparsify(make(), {"2": "4:8"}))] == ["2"]  # unmatched: left alone
    seen = []
    only_last = sparsify(make(), "2:4", filter_fn=lambda module, fqn: seen.append(fqn) or fqn == "3")
    assert seen == ["0", "2", "3"] and [n for n, _ in sparse_layers(only_last)] == ["3"]
    with pytest.raises(ValueError, match=r"no layer to sparsify at 4: 2:4 \(check include/exclude/filter_fn"):
        sparsify(make(), {"4": "2:4"})
    with pytest.raises(TypeError, match="filter_fn must be a callable"):
        sparsify(make(), "2:4", filter_fn="3")


def test_export_folds_masks_into_plain_layers():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Conv1d(16, 8, 1)), "2:4")
    x = torch.randn(2, 16)
    expected = model[0](x)
    export(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Conv1d
    torch.testing.assert_close(model[0](x), expected)
    assert tp.is_transposable_nm(model[0].weight, "2:4")
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Conv1d(16, 8, 1))
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_torch_compile_is_one_graph_and_matches_eager_also_after_refreshes():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), "2:4", refresh_every=1)
    x = torch.randn(4, 16)
    explained = torch._dynamo.explain(model)(x)  # a fresh model: its very first call
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    refresher = MaskRefresher(model).attach(optimizer)
    for _ in range(3):
        eager = model(x)
        eager.sum().backward()
        eager_grad = model[0].weight.grad.clone()
        model.zero_grad()
        out = compiled(x)
        out.sum().backward()
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(model[0].weight.grad, eager_grad)
        optimizer.step()  # new weights, refreshed masks (the buffers change in place)
        optimizer.zero_grad()
    assert len(refresher.history) == 3 and refresher.history[-1]["total"]["flips"] > 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_traces_the_backward_mask_and_matches_eager(backend):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), "2:4", transposable=False,
                     backward_mask=True)
    x = torch.randn(4, 16, requires_grad=True)
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model(x).pow(2).sum().backward()
    eager = x.grad.clone()
    x.grad = None
    torch.compile(model, backend=backend)(x).pow(2).sum().backward()  # backward traced in torch operations
    torch.testing.assert_close(x.grad, eager)


def test_dense_fallback_is_one_info_line_per_reason_not_per_layer(caplog, monkeypatch):
    monkeypatch.setattr(transposable.nn, "_REASONS_LOGGED", set())  # as in a fresh process
    model = sparsify(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32)), "2:4")
    with caplog.at_level(logging.DEBUG, logger="transposable"):
        model(torch.randn(2, 64))
        model(torch.randn(2, 64))
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert info == ["SparseLinear(64, 64): dense masked GEMMs: not on a CUDA device "
                    "(the same for every layer in this state: logged once)"]
    assert debug == ["SparseLinear(64, 64): dense masked GEMMs: not on a CUDA device",
                     "SparseLinear(64, 32): dense masked GEMMs: not on a CUDA device"]


def test_errors():
    with pytest.raises(ValueError, match="gradient must be 'srste' or 'ste', got 'adam'"):
        sparsify(nn.Linear(8, 8), "2:4", gradient="adam")
    with pytest.raises(ValueError, match="no layer to sparsify at 2:4"):
        sparsify(nn.Sequential(nn.Linear(8, 6)), "2:4")
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        sparsify(nn.Linear(8, 8), "2:4", refresh_method="fast")
    with pytest.raises(ValueError, match="has no sparse layers; call sparsify"):
        MaskRefresher(nn.Linear(8, 8))


def run_ddp_workers(out, mode="ddp"):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for path in (Path(f"{out}.0"), Path(f"{out}.1")):
        path.unlink(missing_ok=True)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(out), mode], capture_output=True, text=True, env=env, timeout=300)


def test_ddp_two_processes_keep_identical_masks(tmp_path):
    out = tmp_path / "checked"
    result = run_ddp_workers(out)
    assert result.returncode == 0, result.stderr[-3000:]  # a clean exit, no retry
    assert [int(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)] == [4, 4]  # refreshes at steps 2, 4, 6, 8


def test_fsdp2_two_processes_refresh_whole_tiles_and_checkpoint_the_masks(tmp_path):
    out = tmp_path / "checked"
    result = run_ddp_workers(out, mode="fsdp2")
    assert result.returncode == 0, result.stderr[-3000:]  # a clean exit
    assert [int(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)] == [4, 4]


def test_train_cli_needs_demo_and_sane_epochs(capsys):
    # The full demo runs in tests/test_readme.py, against the README's table.
    assert main(["train"]) == 1
    assert "only --demo is available" in capsys.readouterr().err
    assert main(["train", "--demo", "--epochs", "0"]) == 1
    assert "--epochs must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(6, 16), (2, 3, 16)])
def test_sparse_outputs_can_be_changed_in_place_as_a_plain_layers_can(shape):
    """ReLU(inplace=True) and ``+=`` on a sparse layer's output train as they do out of place."""
    def grads(inplace):
        torch.manual_seed(0)
        model = sparsify(nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 8)), "2:4")
        x = torch.randn(*shape, requires_grad=True)
        out = model[0](x)
        if inplace:
            out += 1.0
        else:
            out = out + 1.0
        model[2](model[1](out)).pow(2).sum().backward()
        return [x.grad] + [p.grad for p in model.parameters()]

    for inplace, plain in zip(grads(True), grads(False)):
        torch.testing.assert_close(inplace, plain)


def test_a_sparse_gpt2_conv1d_output_can_be_changed_in_place():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = sparsify(Conv1D(8, 16), "2:4")  # weight stored (in, out) = (16, 8)
    x = torch.randn(2, 3, 16, requires_grad=True)
    F.relu_(layer(x)).sum().backward()
    expected = (F.linear(x, (layer.weight * layer.mask).t(), layer.bias) > 0).float() @ (layer.weight * layer.mask).t()
    torch.testing.assert_close(x.grad, expected)


def test_fused_encoder_paths_compute_with_the_masks(caplog):
    """In eval() under no_grad, PyTorch's fused encoder reads linear1/linear2's weights
    directly: a sparsified encoder must still compute with W * mask, exactly as the exported
    model (masks folded into plain layers, fused path back on) does."""
    import copy

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
    with caplog.at_level(logging.INFO, logger="transposable"):
        sparsify(encoder, "2:4")
    assert any("fused encoder path is off for layers.0, layers.1" in r.getMessage() for r in caplog.records)
    exported = export(copy.deepcopy(encoder)).eval()
    assert exported.use_nested_tensor and exported.layers[0].activation_relu_or_gelu == 1  # fused path back on
    encoder.eval()
    x = torch.randn(3, 8, 32)
    padding = torch.zeros(3, 8, dtype=torch.bool)
    padding[0, 5:] = True
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": padding}):  # dense tensors, and nested ones
            sparse_out, folded_out = encoder(x, **kwargs), exported(x, **kwargs)
            keep = ~padding if kwargs else torch.ones_like(padding)
            torch.testing.assert_close(sparse_out[keep], folded_out[keep], atol=1e-5, rtol=1e-5)
        dense_out = nn.TransformerEncoder(layer, num_layers=2).eval()(x)
        assert (dense_out - encoder(x)).abs().max() > 1e-2  # the masks change the output: the check can fail


# ---- the GPU path's logic, where the CPU reaches it (issue 28; tests/test_cuda.py runs the rest) --------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_under_autocast_a_sparse_layer_computes_and_trains_as_nn_linear_does(dtype, kind):
    """Autocast runs the GEMMs in its dtype; backward, outside the autocast region, used to
    mix bfloat16 and float32 ("expected m1 and m2 to have the same dtype")."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = sparsify(nn.Linear(64, 32), "2:4", srste_decay=0.25)
        weight, mask = layer.weight, layer.mask
    else:
        from transformers.pytorch_utils import Conv1D

        layer = sparsify(Conv1D(32, 64), "2:4", srste_decay=0.25)  # weight stored (in, out)
        weight, mask = layer.weight.t(), layer.mask.t()
    masked = (weight * mask).detach().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    x = torch.randn(2, 8, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        out, expected = layer(x), F.linear(x_ref, masked, bias)
    assert out.dtype == expected.dtype == dtype
    out.float().pow(2).sum().backward()
    expected.float().pow(2).sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    decay = 0.25 * weight.detach() * ~mask
    grad = layer.weight.grad if kind == "linear" else layer.weight.grad.t()
    torch.testing.assert_close(grad, masked.grad + decay)
    torch.testing.assert_close(layer.bias.grad, bias.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs_are_within_their_rounding_of_the_exact_product(dtype):
    """The tolerance test_cuda.py compares sparse kernels with, checked here where it can
    fail: the dense masked GEMMs fit inside it, a wrong bias or operand does not."""
    from checks import assert_within_rounding

    torch.manual_seed(0)
    layer = sparsify(nn.Linear(256, 64), "2:4").to(dtype)
    x = torch.randn(32, 256, dtype=dtype)
    with torch.no_grad():
        out = layer(x)
    masked = layer.weight * layer.mask
    assert_within_rounding(out, x, masked, layer.bias)
    with pytest.raises(AssertionError, match="off by more than their rounding"):
        assert_within_rounding(out, x, masked)  # the bias left out
    with pytest.raises(AssertionError, match="off by more than their rounding"):
        assert_within_rounding(out, x.flip(0), masked, layer.bias)  # rows read in another order


def test_dense_operands_are_copied_only_where_cusparselt_would_misread_them():
    from transposable.nn import _dense_operand

    x = torch.randn(16, 32)
    assert _dense_operand(x) is x  # row-major
    assert _dense_operand(x.t()).data_ptr() == x.data_ptr()  # column-major: read as it is, not copied
    for strided in (x[:, :24], x[::2], torch.ones(()).expand(16, 32)):  # a column slice, a row stride, y.sum()'s grad
        operand = _dense_operand(strided)
        assert operand.is_contiguous() and torch.equal(operand, strided)


@pytest.mark.parametrize("make", ["slice", "transposed", "expanded"])
def test_strided_inputs_and_gradients_give_the_dense_answer(make):
    torch.manual_seed(0)
    layer = sparsify(nn.Linear(32, 16), "2:4")
    wide = torch.randn(8, 48)
    x = {"slice": wide[:, :32], "transposed": torch.randn(32, 8).t(), "expanded": torch.ones(()).expand(8, 32)}[make]
    x = x.requires_grad_(True) if x.is_leaf else x.detach().requires_grad_(True)
    out = layer(x)
    assert out.is_contiguous()
    out.sum().backward()  # a gradient with strides (0, 0)
    masked = layer.weight * layer.mask
    torch.testing.assert_close(out, F.linear(x, masked, layer.bias))
    torch.testing.assert_close(x.grad, torch.ones(8, 16) @ masked)


def test_copies_and_pickles_leave_the_compressed_cache_out():
    """``copy.deepcopy`` and ``torch.save(model)`` after a GPU forward crashed on the cached
    compressed tensors (torch 2.11 cannot clone them). The cache holds a real
    semi-structured tensor here, built on the CPU."""
    import copy
    import pickle
    import warnings

    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    from transposable.nn import SemiStructuredGEMMs

    layer = sparsify(nn.Linear(16, 16), "2:4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prototype warning
        compressed = SparseSemiStructuredTensorCUSPARSELT(torch.Size([16, 16]), torch.zeros(144, dtype=torch.half),
                                                          None, None, None, None)
    layer._kernels = SemiStructuredGEMMs()
    layer._kernels._w = layer._kernels._w_t = compressed
    layer._kernels._key = (layer.weight.data_ptr(), layer.weight._version, layer.mask._version, torch.half)
    x = torch.randn(4, 16)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied._kernels._key is None and not hasattr(copied._kernels, "_w")
        torch.testing.assert_close(copied(x), layer(x))
    assert layer._kernels._w is compressed  # the original keeps its cache


def test_a_compressed_weight_keeps_the_fused_encoder_path_off():
    """``export(compress=True)`` turned the fused encoder path back on, which cannot take
    semi-structured weights. Compressed weights need CUDA, so one is built on the CPU."""
    import warnings

    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

    from transposable.nn import _fused_encoders

    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    encoder = export(sparsify(nn.TransformerEncoder(layer, num_layers=1), "2:4"))
    assert encoder.layers[0].activation_relu_or_gelu == 1  # plain weights: the fused path is back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = SparseSemiStructuredTensorCUSPARSELT(torch.Size([64, 32]), torch.zeros(1152, dtype=torch.half),
                                                          None, None, None, None)
    encoder.layers[0].linear1.weight = nn.Parameter(compressed, requires_grad=False)
    _fused_encoders(encoder, enabled=False)
    assert encoder.layers[0].activation_relu_or_gelu == 0 and not encoder.use_nested_tensor
    _fused_encoders(encoder, enabled=True)  # what export(compress=True) ends with
    assert encoder.layers[0].activation_relu_or_gelu == 0 and not encoder.use_nested_tensor
