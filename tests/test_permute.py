"""Channel permutations: the search's objective against brute force, its result against an
independent exact mask, local optimality, determinism, the function-preserving model
permutations on tiny Llama (grouped-query), GPT-2 and BERT, pruning with permute=True, and
bad input."""
import itertools
import json
import logging
import re

import numpy as np
import pytest
import torch
from torch import nn

import transposable as tp
from transposable.permute import (apply_permutation, canonical, find_permutation, permutable_dimensions,
                                  permute_model, search)
from transposable.prune import linear_weight, prune
from transposable.solvers._permutation_kernels import columns_value, tiles_value

from checks import brute_force_best

transformers = pytest.importorskip("transformers")
from test_hf_models import tiny_bert  # noqa: E402  (the same tiny models as the other tests)
from test_prune import tiny_gpt2, tiny_llama  # noqa: E402


def brute_tiles_value(A, rows, n, m):
    return sum(brute_force_best(A[np.ix_(rows, range(b, b + m))], n) for b in range(0, A.shape[1], m))


def random_scores(rng, shape, kind):
    if kind == "ties":
        return rng.integers(0, 3, shape).astype(float)  # many equal values and zeros
    if kind == "sparse":
        return np.abs(rng.standard_normal(shape)) * (rng.random(shape) < 0.3)
    return np.abs(rng.standard_normal(shape)) ** 3


@pytest.mark.parametrize("kind", ["gaussian", "ties", "sparse"])
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4)])
def test_group_values_match_brute_force(kind, n, m):
    rng = np.random.default_rng(0)
    for _ in range(10):
        A = random_scores(rng, (3 * m, 3 * m), kind)
        rows = rng.permutation(A.shape[0])[:m].astype(np.int64)
        assert tiles_value(A, rows, n) == pytest.approx(brute_tiles_value(A, rows, n, m), rel=1e-12, abs=1e-12)
        expected = np.sort(A[rows], axis=0)[::-1][:n].sum()
        assert columns_value(A, rows, n) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("transposable", [True, False])
def test_the_search_does_not_depend_on_the_thread_count(transposable):
    import numba

    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    if threads < 2:
        pytest.skip("one thread only: nothing to compare")
    scores = random_scores(np.random.default_rng(3), (64, 96), "gaussian")
    before = numba.get_num_threads()
    results = []
    try:
        for count in (1, threads):
            numba.set_num_threads(count)
            results.append(find_permutation(scores, "2:4", transposable=transposable, max_rounds=40, seconds=60))
    finally:
        numba.set_num_threads(before)
    one, many = results
    assert list(one.rows) == list(many.rows) and list(one.columns) == list(many.columns)
    assert one.kept == many.kept


@pytest.mark.parametrize("transposable", [True, False])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_result_is_a_permutation_and_its_kept_score_is_what_the_exact_mask_keeps(transposable, pattern):
    rng = np.random.default_rng(1)
    scores = random_scores(rng, (32, 48), "gaussian")
    result = find_permutation(scores, pattern, transposable=transposable, max_rounds=30, seconds=60)
    assert sorted(result.rows) == list(range(32)) and sorted(result.columns) == list(range(48))
    if not transposable:
        assert list(result.rows) == list(range(32))  # rows do not matter to row-wise groups
    permuted = scores[result.rows][:, result.columns]
    exact = tp.mask(permuted, pattern, transposable=transposable, method="auto" if not transposable else "mincostflow")
    assert result.kept == pytest.approx(float((permuted * exact).sum()), rel=1e-9)
    identity = tp.mask(scores, pattern, transposable=transposable)
    assert result.kept_identity == pytest.approx(float((scores * identity).sum()), rel=1e-9)
    assert result.kept > result.kept_identity and result.kept > result.kept_random


@pytest.mark.parametrize("tiles", [True, False])
@pytest.mark.parametrize("kind", ["gaussian", "ties"])
def test_a_converged_search_is_a_local_optimum_of_single_swaps(tiles, kind):
    """No swap of two rows of different groups gains, valued by brute force."""
    n, m = 2, 4
    rng = np.random.default_rng(2)
    A = random_scores(rng, (16, 8), kind)
    order, value, _, converged = search(A, n, m, tiles=tiles, seconds=60)
    assert converged

    def total(o):
        groups = [o[g:g + m] for g in range(0, len(o), m)]
        if tiles:
            return sum(brute_tiles_value(A, g, n, m) for g in groups)
        return sum(np.sort(A[g], axis=0)[::-1][:n].sum() for g in groups)

    assert value == pytest.approx(total(order), rel=1e-12)
    for i, j in itertools.combinations(range(16), 2):
        if i // m != j // m:
            swapped = order.copy()
            swapped[[i, j]] = swapped[[j, i]]
            assert total(swapped) <= value + 1e-9 * value


def test_finds_the_planted_grouping():
    """Rows heavy in even columns (x) and in odd ones (y), ordered x x y y: at 1:2 each
    pair keeps only one of its two heavy entries per column until x and y are paired."""
    x, y = np.tile([9.0, 1.0], 4), np.tile([1.0, 9.0], 4)
    A = np.array([x, x, x, x, y, y, y, y])
    order, value, _, converged = search(A, 1, 2, tiles=False, seconds=10)
    assert converged and value == 8 * 9 * 4  # every heavy entry kept
    assert all({tuple(A[order[g]]), tuple(A[order[g + 1]])} == {tuple(x), tuple(y)} for g in range(0, 8, 2))


def test_canonical_order_keeps_the_grouping_and_its_value():
    rng = np.random.default_rng(4)
    A = random_scores(rng, (32, 16), "gaussian")
    order = rng.permutation(32)
    ordered = canonical(order, 4)
    assert {frozenset(g) for g in order.reshape(-1, 4)} == {frozenset(g) for g in ordered.reshape(-1, 4)}
    groups = ordered.reshape(-1, 4)
    assert (np.diff(groups, axis=1) > 0).all() and (np.diff(groups[:, 0]) > 0).all()
    for tiles in (True, False):
        value = lambda o: search(A, 2, 4, tiles=tiles, seconds=1e-9, start=o)[1]  # noqa: E731
        assert value(ordered) == pytest.approx(value(order), rel=1e-12)


def test_same_seed_and_rounds_give_the_same_permutation_and_other_seeds_explore():
    scores = random_scores(np.random.default_rng(3), (64, 64), "gaussian")
    first = find_permutation(scores, "2:4", max_rounds=5, seed=7, seconds=60)
    again = find_permutation(scores, "2:4", max_rounds=5, seed=7, seconds=60)
    other = find_permutation(scores, "2:4", max_rounds=5, seed=8, seconds=60)
    assert np.array_equal(first.rows, again.rows) and np.array_equal(first.columns, again.columns)
    assert first.kept == again.kept
    assert not (np.array_equal(first.rows, other.rows) and np.array_equal(first.columns, other.columns))


def test_torch_scores_and_fixed_axes():
    scores = torch.rand(16, 16, dtype=torch.float64)
    only_columns = find_permutation(scores, "2:4", rows=False, max_rounds=10, seconds=60)
    assert list(only_columns.rows) == list(range(16)) and sorted(only_columns.columns) == list(range(16))
    only_rows = find_permutation(scores, "2:4", columns=False, max_rounds=10, seconds=60)
    assert list(only_rows.columns) == list(range(16)) and only_rows.kept >= only_rows.kept_identity


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scores=-np.ones((8, 8))), ValueError, "scores must be finite and non-negative"),
    (dict(scores=np.full((8, 8), np.nan)), ValueError, "scores must be finite and non-negative"),
    (dict(scores=np.ones(8)), ValueError, r"scores must be a matrix \(out, in\), got shape \(8,\)"),
    (dict(scores=np.ones((8, 8), int)), TypeError, "scores must be a float ndarray or Tensor, got ndarray of dtype int"),
    (dict(scores=np.ones((6, 8))), ValueError, r"scores dimension 'out' \(axis 0\) has size 6, not a multiple of m=4"),
    (dict(scores=np.ones((8, 6)), transposable=False), ValueError, r"'in' \(axis 1\) has size 6"),
    (dict(seconds=0), ValueError, "seconds must be a positive number, got seconds=0"),
    (dict(max_rounds=0), ValueError, "max_rounds must be a positive integer or None, got max_rounds=0"),
    (dict(transposable="yes"), TypeError, "transposable"),
    (dict(pattern="4:2"), ValueError, "n"),
])
def test_bad_input_is_named(kwargs, error, match):
    arguments = {"scores": np.ones((8, 8)), "pattern": "2:4", **kwargs}
    with pytest.raises(error, match=match):
        find_permutation(arguments.pop("scores"), arguments.pop("pattern"), **arguments)


def with_random_biases(model):
    """Random (non-zero) biases everywhere, so that a bias left behind would show."""
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
                module.bias.normal_()
    return model


TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("make,expected", [
    (tiny_llama, ["model.layers.0.self_attn (values)", "model.layers.0.mlp (mlp)"]),
    (tiny_gpt2, ["transformer.h.0.attn (values)", "transformer.h.0.mlp (mlp)"]),
    (tiny_bert, ["bert.encoder.layer.0 (mlp)", "bert.encoder.layer.0.attention (values)"]),
])
@pytest.mark.parametrize("transposable", [True, False])
def test_model_permutations_change_no_output(make, expected, transposable):
    model = with_random_biases(make())
    with torch.no_grad():
        before = model(input_ids=TOKENS).logits.double()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    dimensions = permutable_dimensions(model)
    assert [d.name for d in dimensions][:2] == expected and len(dimensions) == 4
    reports = permute_model(model, "2:4", transposable=transposable, max_rounds=20, seconds=60)
    with torch.no_grad():
        after = model(input_ids=TOKENS).logits.double()
    assert float((after - before).norm() / before.norm()) <= 1e-5
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, weights[name])}
    assert any("value" in name or "v_proj" in name or "c_attn" in name for name in moved)
    assert all(r.gain >= 0 for r in reports) and sum(r.gain for r in reports) > 0


def test_grouped_query_heads_read_their_value_head_permuted_alike():
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    values = next(d for d in permutable_dimensions(model) if d.name.endswith("(values)"))
    assert (values.size, values.block) == (32, 16)  # 2 value heads of 16, read by 4 query heads
    order = np.concatenate([np.arange(16)[::-1], 16 + np.roll(np.arange(16), 3)])
    v, o = attention.v_proj.weight.detach().clone(), attention.o_proj.weight.detach().clone()
    apply_permutation(values, order)
    assert torch.equal(attention.v_proj.weight, v[order])
    expected = torch.cat([o[:, 16 * q:16 * (q + 1)][:, order[16 * (q // 2):16 * (q // 2 + 1)] - 16 * (q // 2)]
                          for q in range(4)], dim=1)
    assert torch.equal(attention.o_proj.weight, expected)
    with pytest.raises(ValueError, match="keeps each block of 16 in place"):
        apply_permutation(values, np.arange(32)[::-1])


def test_a_model_without_known_layers_is_refused_with_what_is_supported():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match="found no permutable dimension in Sequential: permutations know"):
        permute_model(model, "2:4")
    with pytest.raises(ValueError, match="permute=True, but the blocks of Sequential have no permutable dimension"):
        prune(model, [torch.randn(4, 8)], "2:4", permute=True)


def calibration(batches=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 32), generator=generator) for _ in range(batches)]


def logits_error(model, reference):
    with torch.no_grad():
        ours, theirs = (m(input_ids=TOKENS).logits.double() for m in (model, reference))
    return float((ours - theirs).norm() / theirs.norm())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("score", ["sparsegpt", "wanda", "adaprune"])
def test_prune_with_permute_meets_the_pattern_and_moves_the_statistics_along(make, score):
    """Pruning with permute=True equals applying the recorded permutations first and then
    pruning plainly: the statistics of the inputs (Hessians, norms, AdaPrune's targets)
    were moved along with the weights."""
    dense = with_random_biases(make())
    plain, permuted = make(), make()
    plain.load_state_dict(dense.state_dict())
    permuted.load_state_dict(dense.state_dict())
    report = []
    prune(permuted, calibration(), "2:4", score=score, steps=20, permute=True, permute_seconds=1.0, report=report)
    for name, module in permuted.named_modules():
        if name in {r.name for r in report}:
            assert tp.is_transposable_nm(linear_weight(module), "2:4"), name
    moved = [r for r in report if r.permutation]
    assert {r.name.rsplit(".", 1)[-1] for r in moved} >= {"c_fc", "c_proj"} or \
        {r.name.rsplit(".", 1)[-1] for r in moved} == {"v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(r.permutation_seconds > 0 for r in moved)
    assert np.mean([r.permutation_gain for r in moved]) > 0
    assert all(0 < r.error < 1 for r in report)
    # The reference: the same permutations applied first, then the plain prune.
    with torch.no_grad():
        for r in moved:
            module = plain.get_submodule(r.name)
            positions = torch.tensor(r.permutation["positions"])
            weight = linear_weight(module)
            weight.copy_(weight.index_select(r.permutation["axis"], positions))
            if r.permutation["axis"] == 0 and module.bias is not None:
                module.bias.copy_(module.bias[positions])
    assert logits_error(plain, dense) < 1e-5  # the recorded permutations change nothing
    prune(plain, calibration(), "2:4", score=score, steps=20)
    assert logits_error(permuted, plain) < 1e-3  # statistics left in the old order: 0.02 to 0.56


class CumsumMLP(nn.Module):
    """Named like a Llama MLP, but the hidden features are mixed (a running sum): permuting
    them changes the output."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down_proj((self.gate_proj(x) * self.up_proj(x)).cumsum(-1))


def test_a_block_whose_permutation_would_change_its_outputs_is_pruned_unpermuted(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(CumsumMLP(), CumsumMLP())
    reference = nn.Sequential(CumsumMLP(), CumsumMLP())
    reference.load_state_dict(model.state_dict())
    data = [torch.randn(8, 16)]
    report = []
    with caplog.at_level(logging.WARNING, logger="transposable"):
        prune(model, data, "2:4", score="wanda", permute=True, permute_seconds=0.5, report=report)
    assert re.search(r"block 0: the channel permutations changed its outputs \(relative .*\): its layers are named "
                     r"like a known layout but compute something else; it is pruned unpermuted", caplog.text)
    prune(reference, data, "2:4", score="wanda", report=[])
    assert not any(r.permutation for r in report)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)


def test_cli_prune_permute_writes_permuted_weights_and_the_report(tmp_path):
    """The folder loads with plain from_pretrained and equals the in-process result."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from transposable.pretrained import calibration_windows

    text = " ".join(f"word{i % 97} token{i % 13}" for i in range(4000))
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=256, special_tokens=["[UNK]"]))
    folder = tmp_path / "model"
    model = tiny_llama()
    model.save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(folder)
    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "pruned"
    result = subprocess.run([sys.executable, "-m", "transposable", "prune", folder, "--pattern", "2:4", "--transposable",
                             "--score", "wanda", "--calibration", tmp_path / "text.txt", "--samples", "4", "--seqlen",
                             "32", "--permute", "--permute-seconds", "30", "-o", out], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(r"permuted 10 layers: their masks keep \+\d\.\d\d % more score on average", result.stdout)
    assert all("permutations keep +" in line for line in result.stderr.splitlines())
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["permute"] is True and report["permute_seconds"] == 30
    by_name = {layer["name"]: layer for layer in report["layers"]}
    for block in (0, 1):
        for name in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            layer = by_name[f"model.layers.{block}.{name}"]
            assert layer["permutation"]["axis"] == (1 if name.endswith(("o_proj", "down_proj")) else 0)
            assert layer["permutation_seconds"] > 0 and layer["permutation_gain"] > -0.05
        assert by_name[f"model.layers.{block}.self_attn.q_proj"]["permutation"] is None
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = tiny_llama()
    windows = calibration_windows(transformers.AutoTokenizer.from_pretrained(folder), text, 4, 32, 0)
    prune(expected, windows, "2:4", score="wanda", permute=True, permute_seconds=30)
    for (name, ours), (_, theirs) in zip(loaded.named_parameters(), expected.named_parameters()):
        assert torch.equal(ours, theirs), name
