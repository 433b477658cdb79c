"""The public mask API: layouts, containers, dtypes, padding, checkers, metrics, errors."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import transposable as tp
from checks import assert_valid_mask, brute_force_best_at_most, kept, tile_regions
from transposable.masks import resolve_method

PATTERNS = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]



def methods_for(m):
    return [meth for meth in tp.METHODS if meth != "exhaustive" or m <= 5]


@given(st.sampled_from(PATTERNS), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_masks_are_valid_for_any_divisible_shape(pattern, rows, cols, seed):
    n, m = pattern
    weight = np.random.default_rng(seed).standard_normal((rows * m, cols * m))
    for method in methods_for(m):
        mask = tp.transposable_mask(weight, n, m, method=method)
        assert mask.shape == weight.shape
        assert_valid_mask(mask, n, m, transposable=True)
        assert tp.is_transposable_nm(mask, n, m)
    rowwise = tp.nm_mask(weight, n, m)
    assert_valid_mask(rowwise, n, m, transposable=False)


@pytest.mark.parametrize("n,m", PATTERNS)
def test_exact_methods_agree_and_beat_greedy(n, m, rng):
    weight = rng.standard_normal((64, 128))
    exact = tp.transposable_mask(weight, n, m, method="mincostflow")
    for method in methods_for(m):
        mask = tp.transposable_mask(weight, n, m, method=method)
        ratio = tp.ratio_to_optimum(weight, mask, exact)
        if method == "greedy":
            assert 0.95 <= ratio <= 1 + 1e-9
        else:
            assert ratio == pytest.approx(1.0, abs=1e-9)
    # A row-wise mask is a relaxation: it keeps at least as much as any transposable one.
    assert tp.kept_fraction(weight, tp.nm_mask(weight, n, m)) >= tp.kept_fraction(weight, exact) - 1e-12


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("method", ["auto", "greedy", "mincostflow", "exhaustive"])
def test_numpy_in_numpy_out(dtype, method, rng):
    weight = rng.standard_normal((8, 16)).astype(dtype)
    mask = tp.transposable_mask(weight, "2:4", method=method)
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == weight.shape
    assert_valid_mask(mask, 2, 4, transposable=True)
    expected = tp.transposable_mask(weight.astype(np.float64), "2:4", method="mincostflow")
    assert tp.ratio_to_optimum(weight, mask, expected) >= (0.95 if method == "greedy" else 1 - 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["auto", "greedy", "mincostflow", "exhaustive"])
def test_torch_in_torch_out_matches_numpy(dtype, method, rng):
    weight = torch.tensor(rng.standard_normal((8, 16)), dtype=dtype, requires_grad=True)
    mask = tp.transposable_mask(weight, "2:4", method=method)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    assert mask.shape == weight.shape and mask.device == weight.device
    as_numpy = weight.detach().float().numpy()
    assert (mask.numpy() == tp.transposable_mask(as_numpy, "2:4", method=method)).all()
    rowwise = tp.nm_mask(weight, "2:4")
    assert isinstance(rowwise, torch.Tensor) and (rowwise.numpy() == tp.nm_mask(as_numpy, "2:4")).all()


@pytest.mark.parametrize("shape", [(8, 12, 3, 3), (16, 8, 5), (4, 8, 2, 1, 3)])
@pytest.mark.parametrize("transposable", [False, True])
def test_conv_weights_are_masked_tap_by_tap(shape, transposable, rng):
    weight = rng.standard_normal(shape)
    solve = (lambda w: tp.transposable_mask(w, "2:4")) if transposable else (lambda w: tp.nm_mask(w, "2:4"))
    mask = solve(weight)
    assert mask.shape == weight.shape
    assert_valid_mask(mask, 2, 4, transposable=transposable)
    for tap in np.ndindex(*shape[2:]):
        index = (slice(None), slice(None), *tap)
        assert (mask[index] == solve(np.ascontiguousarray(weight[index]))).all()
    as_torch = solve(torch.tensor(weight))
    assert (as_torch.numpy() == mask).all()


@pytest.mark.parametrize("shape", [(6, 10), (5, 8), (8, 7), (3, 3), (7, 6, 2)])
@pytest.mark.parametrize("method", ["exhaustive", "cyclecanceling", "mincostflow", "greedy"])
def test_pad_solves_cut_tiles_as_at_most_n_per_real_row_and_column(shape, method, rng):
    weight = rng.integers(-9, 10, shape).astype(float)  # ties and zeros
    mask = tp.transposable_mask(weight, "2:4", method=method, pad=True)
    assert mask.shape == weight.shape and mask.dtype == bool
    assert tp.is_transposable_nm(mask, "2:4")
    for w, kept_mask in zip(np.moveaxis(weight, (0, 1), (-2, -1)).reshape(-1, *shape[:2]),
                            np.moveaxis(mask, (0, 1), (-2, -1)).reshape(-1, *shape[:2])):
        for rows, cols in tile_regions(*shape[:2], 4):
            best = brute_force_best_at_most(w[rows, cols], 2)
            got = kept(w[rows, cols], kept_mask[rows, cols])
            if method == "greedy":
                assert 2 * got >= best
            else:
                assert got == best
    rowwise = tp.nm_mask(weight, "2:4", pad=True)
    assert rowwise.shape == weight.shape and tp.is_nm_sparse(rowwise, "2:4")


def test_pad_never_wastes_kept_slots_on_padding():
    # A 3x3 corner at 2:4 keeps 2 per row and column: 6 entries. Solved as an exactly-2:4
    # zero-padded 4x4 tile it could keep only 5. (The greedy is held to its 1/2 bound above.)
    for method in ("auto", "cyclecanceling", "mincostflow"):
        assert tp.transposable_mask(np.ones((3, 3)), "2:4", method=method, pad=True).sum() == 6
    weight = torch.ones(7, 7)
    # tiles 4x4, 4x3, 3x4 and 3x3: 8 + 6 + 6 + 6 (a 4x3 tile is limited by its 3 columns)
    assert int(tp.transposable_mask(weight, "2:4", pad=True).sum()) == 8 + 6 + 6 + 6


def test_row_wise_only_needs_in_to_divide(rng):
    mask = tp.nm_mask(rng.standard_normal((3, 8)), "2:4")
    assert_valid_mask(mask, 2, 4, transposable=False)


@pytest.mark.parametrize("method", ["auto", "greedy", "mincostflow"])
def test_same_mask_on_every_run(method, rng):
    weight = np.rint(rng.standard_normal((32, 32)) * 2)  # many ties
    first = tp.transposable_mask(weight, "4:8", method=method)
    for _ in range(3):
        assert (tp.transposable_mask(weight, "4:8", method=method) == first).all()


def test_all_zero_weight_gets_a_valid_mask_and_full_kept_fraction():
    weight = np.zeros((8, 8))
    for method in methods_for(4):
        mask = tp.transposable_mask(weight, "2:4", method=method)
        assert_valid_mask(mask, 2, 4, transposable=True)
        assert tp.kept_fraction(weight, mask) == 1.0


def test_pattern_forms_are_equivalent(rng):
    weight = rng.standard_normal((8, 8))
    expected = tp.transposable_mask(weight, "2:4")
    for args in [(2, 4), ((2, 4),), (tp.Pattern(2, 4),), (np.int64(2), np.int64(4))]:
        assert (tp.transposable_mask(weight, *args) == expected).all()


def test_mask_is_the_one_entry_point(rng):
    weight = rng.standard_normal((8, 16))
    assert (tp.mask(weight, "2:4", transposable=True) == tp.transposable_mask(weight, "2:4")).all()
    assert (tp.mask(weight, (2, 4), transposable=False) == tp.nm_mask(weight, 2, 4)).all()
    greedy = tp.mask(torch.tensor(weight), "4:8", transposable=True, method="greedy")
    assert torch.equal(greedy, tp.transposable_mask(torch.tensor(weight), "4:8", method="greedy"))
    with pytest.raises(ValueError, match="method 'greedy' is a transposable solver; row-wise masks are always exact"):
        tp.mask(weight, "2:4", transposable=False, method="greedy")
    with pytest.raises(TypeError, match="transposable"):
        tp.mask(weight, "2:4")  # row-wise or transposable is always said


def test_tiling_errors_are_one_type_everywhere():
    from transposable.diversity import mask_diversity
    from transposable.nn import sparsify

    for call in (lambda: tp.transposable_mask(np.ones((6, 8)), "2:4"),
                 lambda: tp.nm_mask(np.ones((4, 6)), "2:4"),
                 lambda: mask_diversity("transposable", (6, 8), "2:4")):
        with pytest.raises(tp.TilingError) as info:
            call()
        assert isinstance(info.value, ValueError) and info.value.m == 4 and info.value.size == 6
    with pytest.raises(ValueError, match="no layer to sparsify"):  # the layer was refused by the same rule
        sparsify(torch.nn.Linear(8, 6), "2:4")
    assert tp.MinCostFlowError is __import__("transposable.solvers").solvers.MinCostFlowError


def test_big_endian_arrays_are_accepted(rng):
    weight = rng.standard_normal((8, 8)).astype(">f4")
    expected = tp.transposable_mask(weight.astype("<f4"), "2:4")
    assert (tp.transposable_mask(weight, "2:4") == expected).all()
    assert (tp.nm_mask(weight, "2:4") == tp.nm_mask(weight.astype("<f4"), "2:4")).all()


def test_metrics_do_not_overflow_near_the_largest_float():
    weight = np.array([[1e308, 1.7e308], [1.7e308, 1e308]])
    mask = tp.transposable_mask(weight, "1:2")
    assert mask.tolist() == [[False, True], [True, False]]
    assert tp.kept_fraction(weight, mask) == pytest.approx(3.4 / 5.4)
    assert tp.ratio_to_optimum(weight, ~mask, mask) == pytest.approx(2 / 3.4)


def test_methods_are_case_insensitive_and_auto_picks_the_fastest_exact():
    assert resolve_method("Greedy", tp.parse_pattern("2:4")) == "greedy"
    assert resolve_method("auto", tp.parse_pattern("2:4")) == "exhaustive"
    assert resolve_method("auto", tp.parse_pattern("8:16")) == "cyclecanceling"


# ---- checkers and metrics -------------------------------------------------------------

def test_checkers_look_along_the_right_axis():
    rows_ok = np.array([[1, 1, 0, 0]] * 4)  # 2:4 along in, but every column group along out has 4 or 0
    assert tp.is_nm_sparse(rows_ok, "2:4")
    assert not tp.is_nm_sparse(rows_ok, "2:4", axis=0)
    assert not tp.is_transposable_nm(rows_ok, "2:4")
    assert tp.is_transposable_nm(np.kron(np.eye(2), np.ones((2, 2))), "2:4")
    assert tp.is_nm_sparse(torch.tensor([[0.5, 0.0, -1.0, 0.0]]), "2:4")
    assert not tp.is_nm_sparse(np.array([[1, 1, 1, 0, 0]]), "2:4")  # partial group counts
    assert not tp.is_nm_sparse(np.array([[0, 0, 0, 0, 1, 1, 1]]), "2:4")
    assert tp.is_nm_sparse(np.array([[1, 1, 0, 0, 1, 1, 0]]), "2:4")


def test_kept_fraction_and_ratio_to_optimum():
    weight = np.array([[4.0, -3.0, 2.0, -1.0]])
    assert tp.kept_fraction(weight, np.array([[1, 1, 0, 0]])) == pytest.approx(0.7)
    assert tp.ratio_to_optimum(weight, np.array([[0, 0, 1, 1]]), tp.nm_mask(weight, "2:4")) == pytest.approx(3 / 7)
    assert tp.kept_fraction(torch.tensor(weight), torch.tensor([[True, False, False, False]])) == pytest.approx(0.4)


# ---- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,error,match", [
    (("2:4",), None, None),
    (("2-4",), ValueError, "pattern must look like 'N:M'"),
    (("4:4",), ValueError, r"0 < n < m, got n=4, m=4"),
    ((5, 4), ValueError, r"0 < n < m, got n=5, m=4"),
    ((0, 4), ValueError, r"0 < n < m, got n=0, m=4"),
    ((-1, 4), ValueError, r"0 < n < m"),
    ((1, 1), ValueError, r"m must be at least 2, got m=1"),
    ((2,), TypeError, "m is missing"),
    ((2.0, 4), TypeError, "n must be an integer, got 2.0"),
    ((True, 4), TypeError, "n must be an integer"),
    (("2:4", 4), TypeError, "not both"),
    (((2, 4, 8),), TypeError, r"a pattern tuple is \(n, m\)"),
])
def test_bad_patterns(args, error, match):
    if error is None:
        assert tp.parse_pattern(*args) == (2, 4)
        return
    with pytest.raises(error, match=match):
        tp.parse_pattern(*args)
    with pytest.raises(error, match=match):
        tp.transposable_mask(np.ones((4, 4)), *args)


@pytest.mark.parametrize("weight,error,match", [
    (np.array([[np.nan, 1, 2, 3]] * 4), ValueError, r"weight holds 4 NaN or Inf value\(s\); replace them"),
    (np.array([[np.inf, 1, 2, 3]] * 4), ValueError, "NaN or Inf"),
    (torch.full((4, 4), float("-inf")), ValueError, r"weight holds 16 NaN or Inf"),
    (np.ones(4), ValueError, r"at least 2 dimensions .* got shape \(4,\).*biases"),
    (np.float64(1.0), TypeError, "NumPy array or a torch Tensor, got float64"),
    (np.ones((0, 4)), ValueError, r"weight is empty \(shape \(0, 4\)\)"),
    (np.ones((4, 4), dtype=np.int64), TypeError, r"float dtype .* got int64; convert"),
    (torch.ones(4, 4, dtype=torch.int32), TypeError, "got int32"),
    (np.ones((4, 4), dtype=np.complex64), TypeError, "got complex64"),
    (torch.ones(4, 4, dtype=torch.bool), TypeError, "got bool"),
    ([[1.0] * 4] * 4, TypeError, "got list; wrap it with np.asarray"),
    (np.ones((4, 6)), tp.TilingError, r"'in' \(axis 1\) has size 6, not a multiple of m=4; pass pad=True"),
    (np.ones((6, 4)), tp.TilingError, r"'out' \(axis 0\) has size 6, not a multiple of m=4; pass pad=True"),
])
def test_bad_weights(weight, error, match):
    with pytest.raises(error, match=match):
        tp.transposable_mask(weight, "2:4")


def test_row_wise_rejects_bad_weights_the_same_way():
    with pytest.raises(ValueError, match=r"'in' \(axis 1\) has size 6"):
        tp.nm_mask(np.ones((4, 6)), "2:4")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tp.nm_mask(np.full((4, 4), np.nan), "2:4")


@pytest.mark.parametrize("method,match", [
    ("simplex", r"unknown method 'simplex'; choose from \['auto', 'cyclecanceling', 'exhaustive', 'greedy', 'mincostflow'\]"),
    (None, "unknown method None"),
])
def test_unknown_method(method, match):
    with pytest.raises(ValueError, match=match):
        tp.transposable_mask(np.ones((4, 4)), "2:4", method=method)


def test_method_that_cannot_solve_the_pattern():
    with pytest.raises(ValueError, match=r"method 'exhaustive' cannot solve pattern 4:8: .*use method='cyclecanceling' or 'mincostflow'"):
        tp.transposable_mask(np.ones((8, 8)), "4:8", method="exhaustive")


def test_checker_errors():
    with pytest.raises(ValueError, match=r"at least 2 dimensions"):
        tp.is_nm_sparse(np.ones(4), "2:4")
    with pytest.raises(ValueError, match=r"axis 2 is out of range"):
        tp.is_nm_sparse(np.ones((4, 4)), "2:4", axis=2)


# ---- importance scores ----------------------------------------------------------------

@pytest.mark.parametrize("transposable", [False, True])
def test_scores_replace_the_magnitudes(transposable, rng):
    weight = rng.standard_normal((16, 32))
    importance = np.abs(rng.standard_normal((16, 32))) * np.linspace(0.1, 10, 32)  # e.g. Wanda's |W| ||X_j||
    got = tp.mask(weight, "2:4", transposable=transposable, scores=importance)
    assert (got == tp.mask(importance, "2:4", transposable=transposable)).all()
    assert not (got == tp.mask(weight, "2:4", transposable=transposable)).all()  # not |W| after all
    as_torch = tp.mask(torch.tensor(weight), "2:4", transposable=transposable, scores=importance)
    assert isinstance(as_torch, torch.Tensor) and (as_torch.numpy() == got).all()  # converted to the weight's kind


@pytest.mark.parametrize("scores,error,match", [
    (np.ones((4, 4)), ValueError, r"scores must have the weight's shape \(8, 8\), got \(4, 4\)"),
    (np.full((8, 8), -1.0), ValueError, r"scores must be non-negative .* minimum of -1"),
    (np.full((8, 8), np.nan), ValueError, r"scores holds 64 NaN or Inf value\(s\)"),
    (np.ones((8, 8), dtype=int), TypeError, r"scores must have a float dtype"),
])
def test_bad_scores(scores, error, match):
    with pytest.raises(error, match=match):
        tp.mask(np.ones((8, 8)), "2:4", transposable=True, scores=scores)


@pytest.mark.parametrize("option,value", [("transposable", None), ("transposable", "yes"), ("transposable", 1),
                                          ("pad", "yes"), ("pad", None)])
def test_flags_must_be_bools(option, value):
    options = {"transposable": True, "pad": False, option: value}
    with pytest.raises(TypeError, match=rf"{option} must be True or False, got {value!r}"):
        tp.mask(np.ones((4, 4)), "2:4", **options)


@pytest.mark.parametrize("transposable", [False, True])
def test_a_meta_weight_gets_a_meta_mask_after_the_checks_that_need_no_values(transposable):
    weight = torch.empty(8, 16, device="meta")
    result = tp.mask(weight, "2:4", transposable=transposable)
    assert result.device.type == "meta" and result.dtype == torch.bool and result.shape == weight.shape
    with pytest.raises(tp.TilingError, match=r"'in' \(axis 1\) has size 6"):
        tp.mask(torch.empty(8, 6, device="meta"), "2:4", transposable=transposable)
    with pytest.raises(TypeError, match="got int64"):
        tp.mask(torch.empty(8, 16, dtype=torch.int64, device="meta"), "2:4", transposable=transposable)
