"""Every engine in the registry: valid masks, exactness against independent references,
the greedy's guarantees, determinism."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from transposable import solvers
from checks import assert_valid_tiles, brute_force_best, count_regular_masks, kept, networkx_best

KINDS = ("gaussian", "small-integers", "zeros", "all-equal", "heavy-tailed")
EXACT = [name for name, engine in solvers.TRANSPOSABLE.items() if engine.EXACT]


def random_tiles(rng, k, m, kind):
    """Integer-valued tiles (so every reference is exact), signed, of several kinds."""
    if kind == "gaussian":
        tiles = np.rint(rng.standard_normal((k, m, m)) * 1000)
    elif kind == "small-integers":  # many ties
        tiles = rng.integers(-3, 4, (k, m, m)).astype(float)
    elif kind == "zeros":  # mostly zero, some whole rows/columns zero
        tiles = rng.integers(-9, 10, (k, m, m)) * (rng.random((k, m, m)) < 0.3)
        tiles[:, 0, :] = 0
        tiles[:, :, -1] = 0
    elif kind == "all-equal":
        tiles = np.full((k, m, m), 5.0)
    else:
        tiles = np.clip(np.rint(rng.standard_cauchy((k, m, m)) * 10), -1e6, 1e6)
    return tiles.astype(np.float64)


def engines_for(m):
    return [name for name, engine in solvers.TRANSPOSABLE.items() if engine.supports(1, m) is None]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (3, 4), (4, 8), (3, 8), (8, 16), (16, 32)])
def test_every_engine_returns_valid_masks(n, m, kind, rng):
    tiles = random_tiles(rng, 40, m, kind)
    for name in engines_for(m):
        mask = solvers.TRANSPOSABLE[name].solve(tiles, n)
        assert mask.shape == tiles.shape
        assert_valid_tiles(mask, n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_exact_engines_match_brute_force_on_4x4(n, kind, rng):
    tiles = random_tiles(rng, 60, 4, kind)
    for name in EXACT:
        masks = solvers.TRANSPOSABLE[name].solve(tiles, n)
        for tile, mask in zip(tiles, masks):
            assert kept(tile, mask) == brute_force_best(tile, n), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(2, 8), (4, 8), (5, 8), (8, 16), (4, 16)])
def test_exact_engines_match_networkx(n, m, kind, rng):
    tiles = random_tiles(rng, 12, m, kind)
    for name in [e for e in EXACT if e in engines_for(m)]:
        masks = solvers.TRANSPOSABLE[name].solve(tiles, n)
        for tile, mask in zip(tiles, masks):
            assert kept(tile, mask) == networkx_best(tile, n), name


@given(arrays(np.float64, (3, 4, 4), elements=st.integers(-20, 20).map(float)),
       st.integers(1, 3))
def test_exact_engines_match_brute_force_hypothesis(tiles, n):
    for name in EXACT:
        masks = solvers.TRANSPOSABLE[name].solve(tiles, n)
        assert_valid_tiles(masks, n)
        for tile, mask in zip(tiles, masks):
            assert kept(tile, mask) == brute_force_best(tile, n)


@given(arrays(np.float64, (2, 4, 4), elements=st.integers(0, 6).map(float)), st.integers(1, 3))
def test_greedy_keeps_at_least_half_of_the_optimum(tiles, n):
    masks = solvers.greedy.solve(tiles, n)
    assert_valid_tiles(masks, n)
    for tile, mask in zip(tiles, masks):
        assert 2 * kept(tile, mask) >= brute_force_best(tile, n)


@pytest.mark.parametrize("eps", [1e-3, 1e-6])
def test_greedy_on_its_worst_case_keeps_half_and_2opt_repairs_it(eps):
    # Taking the single largest entry forces the zero: greedy 1+eps, optimum 2.
    tile = np.array([[[1 + eps, 1.0], [1.0, 0.0]]])
    plain = solvers.greedy.solve(tile, 1, rounds=0)
    assert_valid_tiles(plain, 1)
    ratio = kept(tile[0], plain[0]) / brute_force_best(tile[0], 1)
    assert 0.5 <= ratio < 0.51
    improved = solvers.greedy.solve(tile, 1)  # one 2-opt swap reaches the optimum
    assert kept(tile[0], improved[0]) == brute_force_best(tile[0], 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16), (3, 8)])
def test_2opt_never_makes_the_greedy_worse(n, m, kind, rng):
    tiles = random_tiles(rng, 300, m, kind)
    before = np.where(solvers.greedy.solve(tiles, n, rounds=0), np.abs(tiles), 0).sum(axis=(1, 2))
    for rounds in (1, 3):
        masks = solvers.greedy.solve(tiles, n, rounds=rounds)
        assert_valid_tiles(masks, n)
        after = np.where(masks, np.abs(tiles), 0).sum(axis=(1, 2))
        assert (after >= before).all()
    if kind == "gaussian":
        assert after.sum() > before.sum()


def test_greedy_keeps_98_percent_on_gaussian_4_8(rng):
    tiles = rng.standard_normal((3000, 8, 8))
    greedy = solvers.greedy.solve(tiles, 4)
    exact = solvers.mincostflow.solve(tiles, 4)
    assert np.abs(tiles)[greedy].sum() >= 0.98 * np.abs(tiles)[exact].sum()


def test_greedy_completion_fills_rows_the_greedy_pass_leaves_short():
    from transposable.solvers._tile_kernels import greedy_tile, order_entries

    tile = np.array([[2., 8, 6, 8], [8, 8, 3, 4], [6, 2, 9, 0], [8, 6, 2, 7]])
    keep, rows, cols = np.zeros((4, 4), bool), np.zeros(4, np.int64), np.zeros(4, np.int64)
    order = np.empty(16, np.int64)
    key_floats = np.empty(16, np.float32)
    order_entries(tile, False, np.empty(16), np.empty(16, np.int64), key_floats, key_floats.view(np.int32), order,
                  np.empty(16, np.int64), np.empty((8, 256), np.int64))
    assert greedy_tile(tile, 2, keep, rows, cols, order) == 7  # the plain greedy pass keeps 7 of 8
    assert rows.tolist() == [2, 2, 1, 2]
    mask = solvers.greedy.solve(tile[None], 2, rounds=0)
    assert_valid_tiles(mask, 2)
    assert kept(tile, mask[0]) > kept(tile, keep)  # here the best 3-hop path gains weight


@pytest.mark.parametrize("name", sorted(solvers.TRANSPOSABLE))
def test_engines_are_deterministic_and_break_ties_towards_low_indices(name):
    tiles = np.ones((5, 4, 4))
    first = solvers.TRANSPOSABLE[name].solve(tiles, 2)
    assert (solvers.TRANSPOSABLE[name].solve(tiles, 2) == first).all()
    if name != "mincostflow":  # OR-Tools is deterministic but picks its own optimum
        block_diagonal = np.kron(np.eye(2, dtype=bool), np.ones((2, 2), dtype=bool))
        assert (first == block_diagonal).all()


def test_greedy_and_exhaustive_ties_follow_lowest_index_order():
    tile = np.array([[[3., 3, 3, 1], [3, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]])
    # Greedy keeps (0,0), (0,1) [lowest index among the tied 3s], then (1,0).
    assert solvers.greedy.solve(tile, 2, rounds=0)[0][0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("n,m,expected", [(1, 4, 24), (2, 4, 90), (3, 4, 24), (1, 3, 6), (2, 5, 2040)])
def test_exhaustive_enumerates_every_regular_tile(n, m, expected):
    table = solvers.exhaustive.patterns(n, m)
    assert len(table) == expected == count_regular_masks(n, m)
    assert len(np.unique(table, axis=0)) == expected
    assert_valid_tiles(table.reshape(-1, m, m), n)


def test_exhaustive_refuses_large_tiles():
    assert "use method='cyclecanceling' or 'mincostflow'" in solvers.exhaustive.supports(4, 8)
    assert solvers.exhaustive.supports(2, 4) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_exhaustive_on_torch_matches_numpy(dtype, rng):
    tiles = random_tiles(rng, 200, 4, "small-integers")
    from_torch = solvers.exhaustive.solve(torch.tensor(tiles, dtype=dtype), 2)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.bool
    assert (from_torch.numpy() == solvers.exhaustive.solve(tiles, 2)).all()


def test_mincostflow_batches_agree_with_one_call(rng):
    tiles = rng.standard_normal((100, 8, 8))
    whole = solvers.mincostflow.solve(tiles, 4)
    batched = solvers.mincostflow.solve(tiles, 4, arcs_per_call=3 * 64)
    assert np.allclose(np.abs(tiles)[whole].sum(), np.abs(tiles)[batched].sum())
    assert_valid_tiles(batched, 4)


def test_mincostflow_raises_when_ortools_is_not_optimal(monkeypatch, rng):
    # Costs too large for OR-Tools' int64 arithmetic: it answers BAD_COST_RANGE.
    monkeypatch.setattr(solvers.mincostflow, "COST_SCALE", 2**62)
    with pytest.raises(solvers.MinCostFlowError, match="not OPTIMAL"):
        solvers.mincostflow.solve(rng.standard_normal((4, 4, 4)), 2)


def test_mincostflow_tolerance_on_tiny_differences():
    # Differences far below the documented integer resolution may be lost, but never more
    # than n*m*max|w|/COST_SCALE.
    tile = np.array([[[1.0, 1 + 1e-12], [1 + 2e-12, 1.0]]])
    mask = solvers.mincostflow.solve(tile, 1)
    gap = np.abs(tile[0]).max() * 2 / solvers.mincostflow.COST_SCALE
    assert kept(tile[0], mask[0]) >= brute_force_best(tile[0], 1) - gap


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (3, 8)])
def test_rowwise_keeps_the_n_largest_of_each_group(n, m, kind, rng):
    groups = random_tiles(rng, 50, m, kind).reshape(-1, m)
    mask = solvers.rowwise.solve(groups, n)
    assert (mask.sum(1) == n).all()
    best = -np.sort(-np.abs(groups), axis=1)[:, :n].sum(1)
    assert np.array_equal(np.where(mask, np.abs(groups), 0).sum(1), best)
    from_torch = solvers.rowwise.solve(torch.tensor(groups), n)
    assert (from_torch.numpy() == mask).all()
    in_torch = solvers.rowwise.solve_in_torch(torch.tensor(groups), n)  # the accelerators' and compiled code's
    assert (in_torch.numpy() == mask).all()


@pytest.mark.parametrize("solve", [solvers.rowwise.solve, solvers.rowwise.solve_in_torch])
def test_rowwise_ties_go_to_the_lowest_index(solve):
    assert solve(torch.tensor([[2., 2, 2, 2], [1, -3, 3, 0]]), 2).tolist() == [
        [True, True, False, False], [False, True, True, False]]


@pytest.mark.parametrize("kind", KINDS + ("uniform",))
@pytest.mark.parametrize("n,m,count", [(2, 4, 3000), (4, 8, 2000), (8, 16, 1000), (16, 32, 150), (3, 8, 1000)])
def test_cyclecanceling_matches_mincostflow_on_thousands_of_tiles(n, m, count, kind, rng):
    if kind == "uniform":
        tiles = rng.uniform(-1, 1, (count, m, m))
    else:
        tiles = random_tiles(rng, count, m, kind)
    masks = solvers.cyclecanceling.solve(tiles, n)
    assert_valid_tiles(masks, n)
    reference = solvers.mincostflow.solve(tiles, n)
    ours = np.where(masks, np.abs(tiles), 0).sum(axis=(1, 2))
    best = np.where(reference, np.abs(tiles), 0).sum(axis=(1, 2))
    # Both are exact up to mincostflow's documented integer-scaling tolerance.
    tolerance = n * m * np.abs(tiles).max(axis=(1, 2)) / solvers.mincostflow.COST_SCALE
    assert (ours >= best - tolerance).all()
    assert (ours <= best + tolerance).all()


@pytest.mark.parametrize("kind", KINDS + ("banded",))
@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (3, 8), (8, 16)])
def test_cyclecanceling_rowwise_first_is_exact_and_takes_the_rowwise_mask_where_transposable(n, m, kind, rng):
    if kind == "banded":  # half the tiles large on a cyclic band: their row-wise masks are transposable
        band = (np.arange(m)[None, :] - np.arange(m)[:, None]) % m < n
        tiles = np.rint(rng.standard_normal((60, m, m)) * 10 + 1000 * band * (np.arange(60) % 2)[:, None, None])
    else:
        tiles = random_tiles(rng, 60, m, kind)
    masks = solvers.cyclecanceling.solve(tiles, n, rowwise_first=True)
    assert_valid_tiles(masks, n)
    rowwise = solvers.rowwise.solve(tiles.reshape(-1, m), n).reshape(tiles.shape)
    transposable = rowwise.sum(axis=1).max(axis=1) <= n  # every column of the tile keeps at most n
    if kind == "banded":
        assert transposable.any() and not transposable.all()
    assert (masks[transposable] == rowwise[transposable]).all()
    assert (masks[~transposable] == solvers.cyclecanceling.solve(tiles[~transposable], n)).all()
    for tile, mask in zip(tiles[:12], masks[:12]):
        assert kept(tile, mask) == networkx_best(tile, n)


@pytest.mark.parametrize("name", sorted(solvers.TRANSPOSABLE))
def test_a_tile_grid_gives_the_same_masks_as_its_tiles(name, rng):
    n, m = (2, 4) if name == "exhaustive" else (4, 8)
    weight = rng.standard_normal((3 * m, 5 * m)).astype(np.float32)
    grid = weight.reshape(3, m, 5, m)  # a view: tile (a, b) is grid[a, :, b, :]
    tiles = np.ascontiguousarray(grid.transpose(0, 2, 1, 3)).reshape(-1, m, m)
    from_grid = solvers.TRANSPOSABLE[name].solve(grid, n)
    assert from_grid.shape == grid.shape
    from_tiles = solvers.TRANSPOSABLE[name].solve(tiles, n)
    assert (from_grid.transpose(0, 2, 1, 3).reshape(-1, m, m) == from_tiles).all()
    strided = solvers.TRANSPOSABLE[name].solve(weight[:, ::-1].copy()[:, ::-1].reshape(3, m, 5, m), n)
    assert (strided == from_grid).all()


TORCH_ENGINES = [name for name, engine in solvers.TRANSPOSABLE.items() if engine.ACCEPTS_TORCH]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16), (3, 8)])
def test_torch_engines_match_the_numba_kernels(n, m, kind, rng):
    tiles = random_tiles(rng, 200, m, kind).astype(np.float32)
    for name in [e for e in TORCH_ENGINES if e in engines_for(m)]:
        from_torch = solvers.TRANSPOSABLE[name].solve(torch.from_numpy(tiles), n)
        assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.bool
        assert_valid_tiles(from_torch, n)
        from_numpy = solvers.TRANSPOSABLE[name].solve(tiles, n)
        if solvers.TRANSPOSABLE[name].EXACT:  # both optimal: the same kept sum per tile
            kept_torch = np.where(from_torch.numpy(), np.abs(tiles), 0).sum(axis=(1, 2))
            kept_numpy = np.where(from_numpy, np.abs(tiles), 0).sum(axis=(1, 2))
            assert np.allclose(kept_torch, kept_numpy, rtol=1e-12, atol=0)
        else:  # same steps, same ties: the same masks
            assert (from_torch.numpy() == from_numpy).all()


# ---- numeric corners ----------------------------------------------------------------------

def test_greedy_keeps_half_beyond_float32_range():
    # Entries beyond float32's range: ordered in float32 they would all tie (inf) and the
    # greedy kept 0.357 of the optimum; ordered in float64 it keeps at least half.
    tile = np.array([[[1.64e39, 1.85e39, 1.66e39], [1.67e39, 1.25e39, 1.82e300], [1.01e300, 1.55e39, 1.67e39]]])
    best = brute_force_best(tile[0], 1)
    for rounds in (0, 1):
        assert 2 * kept(tile[0], solvers.greedy.solve(tile, 1, rounds=rounds)[0]) >= best
    for name in EXACT:
        assert kept(tile[0], solvers.TRANSPOSABLE[name].solve(tile, 1)[0]) == best


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16), (16, 32)])
def test_numba_and_torch_greedy_agree_on_float64_near_ties(n, m, rng):
    base = rng.integers(1, 6, (500, m, m)).astype(np.float64)
    tiles = base * (1 + rng.integers(-3, 4, base.shape) * 1e-12)  # ties below float32's resolution
    from_numba = solvers.greedy.solve(tiles, n)
    from_torch = solvers.greedy.solve(torch.from_numpy(tiles), n).numpy()
    assert (from_numba == from_torch).all()


def test_exact_engines_do_not_overflow_near_the_largest_float(rng):
    # Every pattern's sum overflowed to inf, so all tied and the first (the smaller pair) won.
    tile = np.array([[[1e308, 1.7e308], [1.7e308, 1e308]]])
    for name, engine in solvers.TRANSPOSABLE.items():
        assert engine.solve(tile, 1)[0].tolist() == [[False, True], [True, False]], name
        if engine.ACCEPTS_TORCH:
            assert engine.solve(torch.from_numpy(tile), 1)[0].tolist() == [[False, True], [True, False]], name
    huge = np.clip(rng.standard_normal((200, 4, 4)) * 1e307, -1.7e308, 1.7e308)
    reference = solvers.mincostflow.solve(huge, 2)
    for name in EXACT:
        ours = np.where(solvers.TRANSPOSABLE[name].solve(huge, 2), np.abs(huge) / 1e307, 0).sum(axis=(1, 2))
        best = np.where(reference, np.abs(huge) / 1e307, 0).sum(axis=(1, 2))
        assert np.allclose(ours, best, rtol=1e-9, atol=0), name


def test_mincostflow_keeps_its_bound_on_float32_near_ties(rng):
    # Scaling w / max in float32 rounds at 2**-24, far coarser than the 2**-30 the bound
    # promises; the costs are now scaled in float64. Reference: enumeration of 2:4 tiles.
    base = rng.integers(1, 4, (3000, 4, 4)).astype(np.float32)
    tiles = (base * (1 + rng.integers(-2, 3, base.shape) * 2.0**-22)).astype(np.float32)
    masks = solvers.mincostflow.solve(tiles, 2)
    ours = np.where(masks, np.abs(tiles.astype(np.float64)), 0).sum(axis=(1, 2))
    best = np.where(solvers.exhaustive.solve(tiles.astype(np.float64), 2), np.abs(tiles.astype(np.float64)),
                    0).sum(axis=(1, 2))
    bound = 2 * 4 * np.abs(tiles).max(axis=(1, 2)).astype(np.float64) / solvers.mincostflow.COST_SCALE
    assert (ours >= best - bound).all()


def test_engines_import_nothing_else_of_the_package():
    """The engines stay usable with NumPy alone: data flows transposable -> solvers, never back."""
    import ast
    from pathlib import Path

    for path in Path(solvers.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("transposable"), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("transposable") for alias in node.names), path.name


# ---- compiled kernels: threads, ordering, dtypes, compile notice ---------------------------

@pytest.mark.parametrize("name,n,m", [("exhaustive", 2, 4), ("greedy", 4, 8), ("cyclecanceling", 8, 16),
                                      ("rowwise", 2, 4)])
def test_masks_do_not_depend_on_the_number_of_threads(name, n, m, rng):
    import numba

    engine = solvers.rowwise if name == "rowwise" else solvers.TRANSPOSABLE[name]
    data = rng.standard_normal((7 * m, 5 * m))  # 7 rows of tiles: uneven chunks on 2 threads
    data[:, :m] = np.rint(data[:, :m])  # ties and zeros too
    blocks = data.reshape(-1, m) if name == "rowwise" else data.reshape(7, m, 5, m)
    masks = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            masks.append(engine.solve(blocks, n))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert (masks[0] == masks[1]).all()


def _solve_in_child(queue):
    tiles = np.random.default_rng(1).standard_normal((64, 8, 8))
    queue.put(solvers.TRANSPOSABLE["cyclecanceling"].solve(tiles, 4).sum())


def test_a_forked_child_solves_on_threads_of_its_own():
    """The thread pool is kept between calls; a child forked after a solve inherits it
    without its threads, and must not wait on them."""
    import multiprocessing

    import numba

    if numba.config.NUMBA_NUM_THREADS < 2 or "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs two threads and fork")
    tiles = np.random.default_rng(1).standard_normal((64, 8, 8))
    expected = solvers.TRANSPOSABLE["cyclecanceling"].solve(tiles, 4).sum()  # the pool now exists here
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_solve_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child's solve never finished")
    assert child.exitcode == 0 and queue.get(timeout=10) == expected == 64 * 8 * 4


@pytest.mark.parametrize("float64_order", [False, True])
@pytest.mark.parametrize("m", [4, 8, 16, 32])
def test_tile_entries_are_ordered_by_decreasing_magnitude_ties_to_the_lowest_index(m, float64_order, rng):
    from transposable.solvers._tile_kernels import order_entries, tile_scratch

    for tile in (rng.integers(0, 4, (m, m)).astype(np.float64), np.abs(rng.standard_normal((m, m))),
                 np.zeros((m, m))):
        if not float64_order:
            tile = tile.astype(np.float32).astype(np.float64)  # what a float32 input gives the kernel
        scratch = tile_scratch(m)
        order = scratch[7]
        order_entries(tile, float64_order, *scratch[3:7], order, *scratch[8:10])
        expected = np.lexsort((np.arange(m * m), -tile.ravel()))  # by -value, then by index
        assert order.tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rowwise_on_cpu_tensors_of_every_float_type_keeps_the_largest(dtype, rng):
    weight = torch.tensor(rng.integers(-4, 5, (64, 8)), dtype=dtype)
    strided = weight.T.contiguous().T  # a transposed view: not contiguous
    for groups in (weight, strided):
        mask = solvers.rowwise.solve(groups, 3)
        values = groups.abs().double().numpy()
        top = np.argsort(-values, axis=1, kind="stable")[:, :3]  # ties to the lowest index
        expected = np.zeros(values.shape, dtype=bool)
        np.put_along_axis(expected, top, True, axis=1)
        assert isinstance(mask, torch.Tensor) and (mask.numpy() == expected).all()


def test_compile_notice_only_when_numba_compiles(monkeypatch, caplog):
    import time

    from numba import njit

    from transposable.solvers import _jit

    solvers.greedy.solve(np.ones((1, 4, 4)), 2)  # compiled or loaded from the cache, unobserved
    monkeypatch.setattr(_jit, "NOTICE_AFTER", 0.0)
    with caplog.at_level("WARNING", logger="transposable.solvers"):
        with _jit.announce_compile("nothing to compile"):
            solvers.greedy.solve(np.ones((1, 4, 4)), 2)
            time.sleep(0.05)
        assert "compiling" not in caplog.text
        with _jit.announce_compile("a new kernel"):
            njit(lambda x: x + 1)(1)
            time.sleep(0.05)
        assert "compiling solver kernels for a new kernel" in caplog.text


def test_the_exact_torch_engine_multiplies_in_float64_only(rng):
    """A float32 matrix product rounds its inputs to 10 mantissa bits where TF32 is on (the
    default of ``set_float32_matmul_precision("high")`` on GPUs), which made "exact" masks
    the best of rounded weights; float64 products are never rounded so. The CPU ignores the
    flag, so the products' dtypes are checked instead, in chunks as on a large weight."""
    from torch.overrides import TorchFunctionMode

    products = {"matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "tensordot", "linear", "__matmul__", "__rmatmul__"}

    class Products(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in products:
                self.dtypes.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    tiles = random_tiles(rng, 300, 4, "small-integers")
    magnitudes = torch.from_numpy(np.abs(tiles).astype(np.float32))  # as the GPU path scores them
    table = torch.from_numpy(solvers.exhaustive.patterns(2, 4).copy())
    seen = Products()
    with seen, pytest.MonkeyPatch.context() as patch:
        patch.setattr(solvers.exhaustive, "SCORES_PER_CHUNK", 90 * 64)  # 64 tiles a product: 5 chunks
        best = solvers.exhaustive._best_patterns(magnitudes, table)
    assert seen.dtypes == [{torch.float64}] * 5
    kept = np.where(table[best].numpy().reshape(-1, 4, 4), np.abs(tiles), 0).sum(axis=(1, 2))
    assert (kept == [brute_force_best(tile, 2) for tile in tiles]).all()
