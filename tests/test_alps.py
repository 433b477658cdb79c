"""ALPS (``score="alps"``): ADMM reconstruction with the exact (transposable) projection, and the
Hessian each group of layers shares."""
import numpy as np
import pytest
import torch

import transposable as tp
from checks import assert_valid_mask, brute_force_best, networkx_best
from transposable.prune import PruneRecipe, prune
from transposable.scores import SCORES
from transposable.scores.alps import _conjugate_gradient, _project, alps, eigenbasis
from transposable.scores.sparsegpt import sparsegpt


def layer_problem(seed, out=16, inp=32, tokens=256):
    """A weight and the Hessian of correlated inputs (as a real layer's are)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inp, inp, generator=generator) * (torch.rand(inp, generator=generator) * 2)
    x = torch.randn(tokens, inp, generator=generator) @ mixing
    return torch.randn(out, inp, generator=generator), x.t() @ x / tokens


def error(w, w0, h):
    d = (w - w0).double()
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))


@pytest.mark.parametrize("pattern,transposable", [("2:4", False), ("2:4", True), ("4:8", True)])
def test_alps_masks_are_exactly_nm_and_beat_sparsegpt(pattern, transposable):
    wins = 0
    for seed in range(8):
        w, h = layer_problem(seed)
        new, keep = alps(w, h, pattern, transposable=transposable)
        n, m = (int(v) for v in pattern.split(":"))
        assert_valid_mask(keep, n, m, transposable=transposable)
        assert bool((new[~keep] == 0).all())
        theirs, _ = sparsegpt(w, h, pattern, transposable=transposable)
        wins += error(new, w, h) < error(theirs, w, h)
    assert wins >= 7, wins  # lower reconstruction error than SparseGPT on (nearly) every layer


def test_the_final_weights_are_the_least_squares_optimum_on_their_support():
    w, h = layer_problem(3)
    new, keep = alps(w, h, "2:4", transposable=True, pcg_steps=200)
    scaled, _, _ = eigenbasis(h, 0.01)
    for i in range(w.shape[0]):  # each row: H_SS x_S = (W0 H)_S, solved directly
        s = keep[i]
        exact = torch.linalg.solve(scaled[s][:, s].double(), (w[i].double() @ scaled.double())[s])
        torch.testing.assert_close(new[i, s].double(), exact, rtol=1e-3, atol=1e-4)


def test_conjugate_gradient_never_raises_the_error_on_a_fixed_support():
    w, h = layer_problem(5)
    scaled, _, _ = eigenbasis(h, 0.01)
    keep = tp.mask(w, "2:4", transposable=True)
    start = w * keep
    before = error(start, w, scaled)
    for steps in (1, 5, 40):
        assert error(_conjugate_gradient(start, w @ scaled, scaled, keep, steps), w, scaled) <= before * (1 + 1e-6)


@pytest.mark.parametrize("pattern,transposable", [("2:4", True), ("3:4", True), ("2:4", False)])
def test_the_projection_is_the_exact_mask_of_the_squares(pattern, transposable, rng):
    n, m = (int(v) for v in pattern.split(":"))
    z = torch.from_numpy(rng.standard_normal((8, 12)).astype(np.float32))
    z[0, :4] = 0  # zeros and ties
    z[1] = z[1].abs().round()
    keep = _project(z, tp.parse_pattern(pattern), transposable, "auto")
    squares = (z * z).double().numpy()
    assert_valid_mask(keep, n, m, transposable=transposable)
    kept = np.where(keep.numpy(), squares, 0)
    if transposable:  # every tile keeps the largest sum of squares any n-regular mask keeps
        for a in range(0, 8, m):
            for b in range(0, 12, m):
                assert kept[a:a + m, b:b + m].sum() == pytest.approx(brute_force_best(squares[a:a + m, b:b + m], n))
    else:
        best = np.sort(squares.reshape(-1, m), axis=1)[:, -n:].sum()
        assert kept.sum() == pytest.approx(best)


@pytest.mark.parametrize("pattern", ["4:8", "8:16"])
def test_the_projection_solves_only_the_tiles_the_rowwise_mask_does_not(pattern, rng):
    n, m = (int(v) for v in pattern.split(":"))
    z = torch.from_numpy(rng.integers(-6, 7, (2 * m, 3 * m)).astype(np.float32))  # integers: ties, zeros
    z[:m, :n] = 9  # every row wants the same columns: the row-wise mask is not transposable
    band = (torch.arange(m)[None, :] - torch.arange(m)[:, None]) % m < n
    z[m:, m:2 * m] = band * 9.0  # a band: the row-wise mask is already transposable
    rowwise = tp.mask(z, pattern, transposable=False, scores=z * z)
    columns = rowwise.reshape(2, m, 3, m).sum(dim=1)
    assert (columns <= n).all(dim=-1).any() and (columns > n).any(dim=-1).any()  # both kinds of tile
    keep = _project(z, tp.parse_pattern(pattern), True, "auto")
    assert_valid_mask(keep, n, m, transposable=True)
    squares = (z * z).double().numpy()
    for a in range(0, 2 * m, m):
        for b in range(0, 3 * m, m):
            assert np.where(keep.numpy(), squares, 0)[a:a + m, b:b + m].sum() == pytest.approx(
                networkx_best(squares[a:a + m, b:b + m], n))


@pytest.mark.parametrize("pattern", ["4:8", "8:16"])
def test_the_compiled_projection_equals_the_general_one(pattern, rng, monkeypatch):
    # "auto" is cycle canceling here: the compiled pass; "mincostflow" takes the general path.
    z = torch.from_numpy(rng.standard_normal((4 * 16, 6 * 16)).astype(np.float32))  # no ties: one optimum
    z[:16, :16] += 3 * (torch.arange(16) % 2)  # tiles whose row-wise masks are not transposable
    calls, solve = [], tp.solvers.cyclecanceling.solve
    monkeypatch.setattr(tp.solvers.cyclecanceling, "solve", lambda *a, **k: calls.append(k) or solve(*a, **k))
    fast = _project(z, tp.parse_pattern(pattern), True, "auto")
    assert calls == [{"rowwise_first": True}]
    assert torch.equal(fast, _project(z, tp.parse_pattern(pattern), True, "mincostflow"))
    assert torch.equal(fast, tp.mask(z, pattern, transposable=True, scores=z * z))


def test_alps_is_reproducible():
    w, h = layer_problem(7)
    first, second = alps(w, h, "4:8"), alps(w, h, "4:8")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("options,match", [
    ({"rho": 0.0}, r"rho must be a positive number, got 0.0"),
    ({"rho": float("nan")}, r"rho must be a positive number, got nan"),
    ({"iterations": 0}, r"iterations must be a positive integer, got 0"),
    ({"iterations": 2.5}, r"iterations must be a positive integer, got 2.5"),
    ({"pcg_steps": True}, r"pcg_steps must be a positive integer, got True"),
    ({"dampening": -1}, r"dampening must be a non-negative number, got -1"),
    ({"steps": 5}, r"score 'alps' takes no option 'steps' \(its options: dampening, rho, iterations, pcg_steps\)"),
])
def test_every_option_is_checked(options, match):
    with pytest.raises(ValueError, match=match):
        PruneRecipe("2:4", score="alps", options=options)


def test_layers_reading_the_same_input_share_one_hessian(monkeypatch):
    """q/k/v and gate/up: one statistics object (one Hessian, one eigendecomposition)."""
    pytest.importorskip("transformers")
    from test_prune import calibration, tiny_llama

    seen = {}
    original = SCORES["alps"].prune

    def recording(layer, weight, stats, recipe):
        seen[next(name for name, module in model.named_modules() if module is layer)] = stats
        return original(layer, weight, stats, recipe)

    monkeypatch.setattr(SCORES["alps"], "prune", recording)
    model = tiny_llama(layers=1)
    prune(model, calibration(), "2:4", score="alps", options={"iterations": 5})
    prefix = "model.layers.0."
    groups = {}
    for name, stats in seen.items():
        groups.setdefault(id(stats), []).append(name[len(prefix):])
    assert sorted(sorted(g) for g in groups.values()) == [
        ["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["self_attn.k_proj", "self_attn.q_proj",
                                                              "self_attn.v_proj"], ["self_attn.o_proj"]]
    for stats in seen.values():
        assert len(stats._derived) == 1  # factored once for the whole group
