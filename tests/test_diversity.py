"""Mask diversity: exact counts against brute force and published values, the estimate's
stated accuracy, every structure, the CLI, and bad input."""
import math

import pytest

from transposable import solvers
from checks import count_regular_masks
from transposable.cli import main
from transposable.diversity import (
    MAX_EXACT_DIGITS,
    diversity_table,
    mask_diversity,
    transposable_tile_count,
    transposable_tile_log10,
    transposable_tile_paper_log10,
)


@pytest.mark.parametrize("n,m,expected", [
    (1, 4, 24), (2, 4, 90),  # the known values
    (2, 8, 187_530_840), (4, 8, 116_963_796_250),
])
def test_known_transposable_tile_counts(n, m, expected):
    assert transposable_tile_count(n, m) == expected
    assert mask_diversity("transposable", (m, m), f"{n}:{m}").exact() == expected


@pytest.mark.parametrize("n,m", [(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4), (1, 5), (2, 5), (3, 5), (4, 5)])
def test_tile_counts_match_brute_force_enumeration(n, m):
    assert transposable_tile_count(n, m) == count_regular_masks(n, m)
    assert transposable_tile_count(n, m) == len(solvers.exhaustive.patterns(n, m))


@pytest.mark.parametrize("m", [2, 3, 5, 6, 7, 9, 12])
def test_one_per_row_and_column_counts_permutations(m):
    # n = 1 (and n = m - 1, its complement) tiles are permutation matrices: m! of them.
    assert transposable_tile_count(1, m) == math.factorial(m)
    assert transposable_tile_count(m - 1, m) == math.factorial(m)


@pytest.mark.parametrize("m,expected", [(5, 2040), (6, 67_950), (7, 3_110_940), (8, 187_530_840)])
def test_two_per_row_and_column_matches_the_published_sequence(m, expected):
    # OEIS A001499: m x m 0/1 matrices with exactly two 1s in every row and column.
    assert transposable_tile_count(2, m) == expected


@pytest.mark.parametrize("n,m", [(3, 7), (5, 12), (6, 16), (7, 16)])
def test_tile_count_is_symmetric_under_complement(n, m):
    assert transposable_tile_count(n, m) == transposable_tile_count(m - n, m)


@pytest.mark.parametrize("n,m,published", [
    (5, 10, 6_736_218_287_430_460_752),
    (6, 12, 64_051_375_889_927_380_035_549_804_336),
])
def test_half_full_tile_counts_match_the_published_sequence(n, m, published):
    # OEIS A058527: 2n x 2n 0/1 matrices with n ones in every row and column.
    assert transposable_tile_count(n, m) == published
    assert mask_diversity("transposable", (m, m), f"{n}:{m}").exact() == published


def test_exact_count_up_to_m16_is_computed():
    count = transposable_tile_count(8, 16)
    # Between bounds that do not come from the count: at least the tiles built from
    # disjoint permutations, at most every row chosen freely.
    assert math.factorial(16) < count < math.comb(16, 8) ** 16
    assert not mask_diversity("transposable", (16, 16), "8:16").estimated


@pytest.mark.parametrize("n,m,factorials", [(2, 4, (4, 3)), (4, 8, (8, 7, 6, 5)), (1, 4, (4, 3, 2)), (3, 4, (4,))])
def test_paper_approximation_is_the_published_formula(n, m, factorials):
    # Hubara et al. count zeros: Z = m - n of them per row and column, m! (m-1)! ... (m-Z+1)!.
    expected = math.prod(math.factorial(f) for f in factorials)
    assert 10 ** transposable_tile_paper_log10(n, m) == pytest.approx(expected, rel=1e-9)
    md = mask_diversity("transposable", (m, 2 * m), f"{n}:{m}", approximation="hubara2021")
    assert md.source == "hubara2021" and md.estimated
    assert md.log10 == pytest.approx(2 * math.log10(expected))
    with pytest.raises(ValueError, match="closed-form approximation of Hubara et al"):
        md.exact()


def test_one_2_4_tile_is_144_by_the_paper_and_90_counted():
    assert round(10 ** mask_diversity("transposable", (4, 4), "2:4", approximation="hubara2021").log10) == 144
    assert mask_diversity("transposable", (4, 4), "2:4").exact() == 90


def test_the_approximation_reverses_the_papers_4_8_versus_2_4_comparison():
    # Over one 8x8 block: 2:4 row-wise allows 6**16 = 2.8e12 masks; 4:8 transposable 1.2e11
    # counted exactly, but 8! 7! 6! 5! = 1.8e13 by the paper's approximation.
    rowwise = mask_diversity("rowwise", (8, 8), "2:4")
    exact = mask_diversity("transposable", (8, 8), "4:8")
    paper = mask_diversity("transposable", (8, 8), "4:8", approximation="hubara2021")
    assert rowwise.exact() == 6**16
    assert exact.log10 < rowwise.log10 < paper.log10
    table = dict(diversity_table((768, 3072), 0.5))
    assert table["4:8 transposable"].log10 < table["2:4 rowwise"].log10
    assert table["4:8 transposable (Hubara et al. approx.)"].log10 > table["2:4 rowwise"].log10


def test_approximation_errors():
    with pytest.raises(ValueError, match="unknown approximation 'stirling'"):
        mask_diversity("transposable", (4, 4), "2:4", approximation="stirling")
    with pytest.raises(ValueError, match="approximation='hubara2021' is a formula for transposable N:M only"):
        mask_diversity("rowwise", (4, 4), "2:4", approximation="hubara2021")


@pytest.mark.parametrize("n,m", [(2, 8), (4, 8), (6, 12), (4, 16), (8, 16)])
def test_asymptotic_estimate_is_within_its_stated_accuracy(n, m):
    estimate = 2 * m * math.log10(math.comb(m, n)) - math.log10(math.comb(m * m, n * m)) - 0.5 * math.log10(math.e)
    exact = math.log10(transposable_tile_count(n, m))
    assert abs(estimate - exact) <= 0.005 * exact  # "within 0.5 % in log10 from m = 8"


def test_large_tiles_fall_back_to_the_labelled_estimate():
    md = mask_diversity("transposable", (64, 64), "16:32")
    assert md.estimated
    assert md.log10 == pytest.approx(4 * transposable_tile_log10(16, 32))
    with pytest.raises(ValueError, match="asymptotic estimate"):
        md.exact()
    small_side = mask_diversity("transposable", (32, 32), "2:32")  # min(n, m - n) <= 3: exact
    assert not small_side.estimated and small_side.exact() == transposable_tile_count(2, 32)


def test_rowwise_and_unstructured_known_values():
    assert mask_diversity("rowwise", 64, "2:4").exact() == 6**16
    assert mask_diversity("rowwise", (8, 8), (2, 4)).exact() == 6**16
    assert mask_diversity("unstructured", 64, density=0.5).exact() == math.comb(64, 32)
    assert mask_diversity("unstructured", 64, "2:4").exact() == math.comb(64, 32)  # density from the pattern


def test_block_sparsity_counts_blocks():
    md = mask_diversity("block", (16, 16), density=0.5, block=4)  # 16 blocks, 8 kept
    assert md.exact() == math.comb(16, 8)
    assert md.log10 == pytest.approx(math.log10(math.comb(16, 8)))


def test_log10_matches_the_exact_integer():
    for structure, kwargs in [("transposable", {"pattern": "4:8"}), ("rowwise", {"pattern": "4:8"}),
                              ("unstructured", {"density": 0.5}), ("block", {"density": 0.25, "block": 2})]:
        md = mask_diversity(structure, (64, 128), **kwargs)
        assert md.log10 == pytest.approx(math.log10(md.exact()), rel=1e-12)


def test_absurd_sizes_answer_in_log10_without_building_the_integer():
    md = mask_diversity("rowwise", 10**12, "2:4")
    assert md.log10 == pytest.approx(10**12 / 4 * math.log10(6))
    with pytest.raises(ValueError, match=r"digits, more than MAX_EXACT_DIGITS"):
        md.exact()
    assert mask_diversity("unstructured", 10**12, density=0.5).log10 > MAX_EXACT_DIGITS
    assert mask_diversity("transposable", 16 * 10**12, "2:4").log10 == pytest.approx(10**12 * math.log10(90))


def test_more_structure_means_fewer_masks():
    table = dict(diversity_table((768, 3072), 0.5))
    assert table["unstructured"].log10 > table["8:16 rowwise"].log10 > table["4:8 rowwise"].log10
    assert table["4:8 rowwise"].log10 > table["4:8 transposable"].log10 > table["2:4 transposable"].log10
    assert table["block 2x2"].log10 > table["block 4x4"].log10 > table["block 8x8"].log10
    assert "16:32 transposable" in table and table["16:32 transposable"].estimated


@pytest.mark.parametrize("call,error,match", [
    (lambda: mask_diversity("banded", 64, "2:4"), ValueError, r"unknown structure 'banded'; choose from"),
    (lambda: mask_diversity("unstructured", 64, density=0), ValueError, r"density must be in \(0, 1\], .* got 0"),
    (lambda: mask_diversity("unstructured", 64, density=1.5), ValueError, "got 1.5"),
    (lambda: mask_diversity("unstructured", 64, density=True), ValueError, "got True"),
    (lambda: mask_diversity("unstructured", 64), ValueError, r"give density=\.\.\. \(fraction kept\) or a pattern"),
    (lambda: mask_diversity("rowwise", 64, "4:4"), ValueError, r"0 < n < m, got n=4, m=4"),
    (lambda: mask_diversity("rowwise", 64), ValueError, "needs a pattern"),
    (lambda: mask_diversity("transposable", (6, 8), "4:8"), ValueError, r"dimension 'out' \(axis 0\) has size 6, not a multiple of m=8; shape \(6, 8\) does not split into 8x8 tiles"),
    (lambda: mask_diversity("rowwise", (8, 6), "2:4"), ValueError, r"dimension 'in' \(axis 1\) has size 6, not a multiple of m=4"),
    (lambda: mask_diversity("transposable", 40, "2:4"), ValueError, r"40 weights do not split into 4x4 tiles"),
    (lambda: mask_diversity("block", 64, density=0.5), ValueError, "needs block=b"),
    (lambda: mask_diversity("block", (8, 8), density=0.5, block=3), ValueError, r"not a multiple of m=3; shape \(8, 8\) does not split into 3x3 blocks"),
    (lambda: mask_diversity("block", (8, 8), density=0.5, block=0), ValueError, "block must be a positive integer"),
    (lambda: mask_diversity("rowwise", (64,), "2:4"), ValueError, "has one dimension"),
    (lambda: mask_diversity("rowwise", 0, "2:4"), ValueError, "at least one weight"),
    (lambda: mask_diversity("rowwise", (8, 8.0), "2:4"), TypeError, "integer sizes"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, *capsys.readouterr()


def test_cli_single_structure(capsys):
    code, out, err = run(capsys, "diversity", "--pattern", "2:4", "--transposable", "--shape", "4x4")
    assert code == 0, err
    assert "structure  transposable 2:4" in out and "exact      90" in out
    assert "paper      2.1584 (Hubara et al. 2021's closed-form approximation, not a count)" in out  # log10 144
    code, out, _ = run(capsys, "diversity", "--pattern", "4:8", "--transposable", "--shape", "768x3072")
    expected = mask_diversity("transposable", (768, 3072), "4:8")
    assert f"log10 MD   {expected.log10:.4f}" in out and "digits" in out


def test_cli_table(capsys):
    code, out, err = run(capsys, "diversity", "--table", "--shape", "768x3072", "--density", "0.5")
    assert code == 0, err
    for label, md in diversity_table((768, 3072), 0.5):
        assert label in out and f"{md.log10:.2f}" in out
    assert "16:32 transposable (estimate)" in out  # beyond the exact count's reach
    assert "4:8 transposable (Hubara et al. approx.)" in out


@pytest.mark.parametrize("argv,match", [
    (["--shape", "768-3072", "--pattern", "2:4"], "shape must look like 768x3072"),
    (["--shape", "64", "--structure", "unstructured", "--density", "0"], r"density must be in \(0, 1\]"),
    (["--shape", "6x8", "--pattern", "4:8", "--transposable"], "not a multiple of m=8"),
    (["--shape", "64", "--pattern", "2:4", "--transposable", "--structure", "rowwise"], "conflicts"),
])
def test_cli_errors_are_one_line(capsys, argv, match):
    try:
        code = main(["diversity", *argv])
    except SystemExit as exit_info:  # argparse: usage errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code in (1, 2) and err.count("\n") == 1
    import re

    assert re.search(match, err), err
