"""Mask diversity (Hubara et al., 2021): how many masks a sparsity structure allows.

The more masks a structure allows over a tensor, the closer the best of them can get to
the best unstructured mask, so mask diversity (MD) tracks the accuracy a structure can
reach. Counts here are exact integers (computed on demand: they can have millions of
digits) with their log10, for:

- ``"unstructured"``: any ``kept`` of ``T`` weights, ``C(T, kept)``;
- ``"rowwise"``: N:M along ``in``, ``C(M, N) ** (T / M)``;
- ``"transposable"``: every M x M tile keeps N per row and per column; the number of
  such tiles, by an exact dynamic programme, to the power of the number of tiles;
- ``"block"``: b x b blocks kept or pruned whole, ``C(T / b**2, kept blocks)``.

Beside the exact transposable count, ``approximation="hubara2021"`` gives Hubara et al.'s
closed-form approximation, labelled as such: ``(M! (M-1)! ... (M-Z+1)!) ** (T / M**2)``
with ``Z = M - N`` the zeros per group (the paper counts N:M by zeros). It overstates the
count (one 2:4 tile: 144 against the true 90; one 4:8 tile: 1.8e13 against 1.2e11), enough
to reverse a comparison: by the approximation 4:8 transposable allows more masks than 2:4
row-wise, counted exactly it allows fewer.
"""
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

from .layout import tiling_error
from .patterns import parse_pattern

STRUCTURES = ("unstructured", "rowwise", "transposable", "block")

#: The exact transposable tile count is computed up to this tile size (under a second),
#: and beyond it while min(n, m - n) is at most ``EXACT_SMALL_SIDE``.
EXACT_MAX_M = 16
EXACT_SMALL_SIDE = 3

#: Where a ``MaskDiversity``'s number comes from.
SOURCES = {
    "exact": "exact count",
    "canfield-mckay": "asymptotic estimate (Canfield and McKay, 2005)",
    "hubara2021": "closed-form approximation of Hubara et al. (2021), not a count",
}

#: ``MaskDiversity.exact()`` refuses counts with more decimal digits than this.
MAX_EXACT_DIGITS = 10**7

_LOG10_E = math.log10(math.e)


@dataclass(frozen=True)
class MaskDiversity:
    """The number of masks a structure allows over a tensor (made by :func:`mask_diversity`).

    Parameters
    ----------
    structure : str
        One of ``STRUCTURES``.
    log10 : float
        The count's log10 (exact up to float rounding), or that of the estimate or
        approximation ``source`` names.
    source : str
        ``"exact"``, ``"canfield-mckay"`` (transposable, large m) or ``"hubara2021"`` (the
        paper's closed form); see ``SOURCES``.
    _exact : callable or None
        Gives the exact integer on demand; None where there is none.

    Examples
    --------
    >>> md = mask_diversity("rowwise", (4, 8), "2:4")
    >>> md.exact(), round(md.log10, 3), md.source
    (1679616, 6.225, 'exact')
    """

    structure: str
    log10: float
    source: str
    _exact: object  # zero-argument callable giving the exact int, or None

    @property
    def estimated(self):
        """True unless ``log10`` is that of the exact count."""
        return self.source != "exact"

    def exact(self):
        """The count as an exact Python integer.

        Raises
        ------
        ValueError
            If the count is only estimated, or has more than ``MAX_EXACT_DIGITS`` digits.
        """
        if self._exact is None:
            raise ValueError(f"no exact {self.structure} count here: its log10 ({self.log10:.6g}) "
                             f"is an {SOURCES[self.source]}; see transposable_tile_log10")
        if self.log10 >= MAX_EXACT_DIGITS:
            raise ValueError(f"the exact count has about {self.log10:.3g} digits, more than "
                             f"MAX_EXACT_DIGITS={MAX_EXACT_DIGITS}; use .log10")
        return self._exact()


def mask_diversity(structure, shape, pattern=None, *, density=None, block=None, approximation=None):
    """Mask diversity of a sparsity structure over a tensor.

    Parameters
    ----------
    structure : {"unstructured", "rowwise", "transposable", "block"}
    shape : int or tuple of int
        The tensor: its number of weights ``T``, or its shape ``(out, in[, *kernel])``
        (needed to check that ``"transposable"`` tiles and ``"block"`` blocks fit).
    pattern : str or tuple, optional
        ``"N:M"`` for ``"rowwise"`` and ``"transposable"``; for ``"unstructured"`` and
        ``"block"`` it sets the density ``N / M`` when ``density`` is not given.
    density : float, optional
        Fraction of weights kept, in (0, 1], for ``"unstructured"`` and ``"block"``. The
        kept count is ``round(density * T)`` (blocks: ``round(density * blocks)``).
    block : int, optional
        Block side ``b`` for ``"block"``.
    approximation : {None, "hubara2021"}
        ``"hubara2021"``: for ``"transposable"``, Hubara et al.'s closed-form
        approximation instead of the count (see :func:`transposable_tile_paper_log10`).

    Returns
    -------
    MaskDiversity
        ``.log10`` always; ``.exact()`` gives the integer.

    Raises
    ------
    ValueError
        For an unknown structure or approximation, a density outside (0, 1], a missing
        pattern, density or block, or a shape that the pattern's groups, tiles or blocks do
        not divide.

    Notes
    -----
    Axis convention as elsewhere: groups of M run along ``in`` (axis 1), tiles and blocks
    cover ``(out, in)`` of every kernel tap. With only a size ``T``, groups, tiles and
    blocks are assumed to fit when ``T`` is a multiple of M, M**2 or b**2.

    References
    ----------
    Hubara et al., "Accelerated Sparse Neural Training: A Provable and Efficient Method
    to Find N:M Transposable Masks", NeurIPS 2021, section 3.

    Examples
    --------
    >>> mask_diversity("transposable", (4, 4), "2:4").exact()
    90
    >>> mask_diversity("rowwise", 64, "2:4").exact() == 6**16
    True
    >>> round(mask_diversity("unstructured", 10**12, density=0.5).log10)
    301029995658
    >>> round(10 ** mask_diversity("transposable", (4, 4), "2:4", approximation="hubara2021").log10)
    144
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose from {list(STRUCTURES)}")
    if approximation not in (None, "hubara2021"):
        raise ValueError(f"unknown approximation {approximation!r}; the one available is 'hubara2021'")
    if approximation is not None and structure != "transposable":
        raise ValueError(f"approximation={approximation!r} is a formula for transposable N:M only, "
                         f"not {structure!r}")
    size, dims = _size_and_dims(shape)
    if structure in ("rowwise", "transposable"):
        if pattern is None:
            raise ValueError(f"structure {structure!r} needs a pattern such as '2:4'")
        n, m = parse_pattern(pattern)
        if structure == "rowwise":
            _check_divides(size, dims, m, axes=(1,), what=f"groups of m={m}")
            groups = size // m
            choices = math.comb(m, n)
            return MaskDiversity(structure, groups * math.log10(choices), "exact", lambda: choices**groups)
        _check_divides(size, dims, m, axes=(0, 1), what=f"{m}x{m} tiles")
        tiles = size // (m * m)
        if approximation == "hubara2021":
            return MaskDiversity(structure, tiles * transposable_tile_paper_log10(n, m), "hubara2021", None)
        if _tile_count_is_exact(n, m):
            per_tile = transposable_tile_count(n, m)
            return MaskDiversity(structure, tiles * math.log10(per_tile), "exact", lambda: per_tile**tiles)
        return MaskDiversity(structure, tiles * transposable_tile_log10(n, m), "canfield-mckay", None)

    density = _density(density, pattern)
    if structure == "unstructured":
        kept = round(density * size)
        return MaskDiversity(structure, _log10_comb(size, kept), "exact", lambda: math.comb(size, kept))
    if block is None:
        raise ValueError("structure 'block' needs block=b, the side of the b x b blocks")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    _check_divides(size, dims, block, axes=(0, 1), what=f"{block}x{block} blocks")
    blocks = size // (block * block)
    kept = round(density * blocks)
    return MaskDiversity(structure, _log10_comb(blocks, kept), "exact", lambda: math.comb(blocks, kept))


@lru_cache(maxsize=None)
def transposable_tile_count(n, m):
    """Exact number of m x m 0/1 matrices with ``n`` ones in every row and every column.

    Rows are filled one at a time; the state is how many columns hold 0, 1, ..., n ones
    (columns are interchangeable, so this is all that matters), and a row choosing
    ``x_k`` columns among the ``c_k`` holding ``k`` ones contributes ``prod C(c_k, x_k)``
    ways. Only half the rows are filled: the ways to finish from a state are the ways to
    start up to its mirror image (column needs n - k instead of k), so the count is the
    sum over middle states of the product. The count is symmetric in n and m - n
    (complement every entry); m = 16 takes about a second.

    Examples
    --------
    >>> transposable_tile_count(2, 4), transposable_tile_count(1, 4)
    (90, 24)
    >>> transposable_tile_count(4, 8)
    116963796250
    """
    n, m = parse_pattern(n, m)
    n = min(n, m - n)
    first = m // 2
    base = m + 1  # a state is an integer: digit k counts the columns holding k ones
    start = m  # every column empty
    layers = [{start: 1}]
    for _ in range(m - first):
        layers.append(_next_row(layers[-1], n, base))
    # Meet in the middle: a column holding k ones after the first rows needs n - k from
    # the rest. Finishing one such arrangement of columns is filling the remaining rows
    # from empty up to those needs: the mirrored state's count, shared equally by its
    # m! / prod(c_k!) arrangements.
    second = layers[m - first]
    total = 0
    for state, ways in layers[first].items():
        counts = _digits(state, base, n + 1)
        mirrored = sum(c * base**k for k, c in enumerate(reversed(counts)))
        if mirrored in second:
            arrangements = math.factorial(m) // math.prod(math.factorial(c) for c in counts)
            total += ways * (second[mirrored] // arrangements)
    return total


def _next_row(layer, n, base):
    """States and counts after one more row of n ones.

    The row is placed level by level: it takes ``x`` of the ``c`` columns holding
    ``level`` ones (``C(c, x)`` ways), which move up one level once this level is done.
    Partial states (levels so far, ones still to place, columns moving up) that coincide
    are merged, so no state's moves are ever listed one by one; a row whose ones are all
    placed goes straight to the result. States are integers (digit k in base ``m + 1``
    counts the columns holding k ones): cheap to hash.
    """
    side = n + 1  # partial key = (state * side + left) * side + moving_up
    binomial = [[math.comb(c, x) for x in range(side)] for c in range(base)]
    top = base**n
    digit_sums = {}  # columns above a level, memoized by the digits above it
    partial = {(state * side + n) * side: ways for state, ways in layer.items()}
    done = defaultdict(int)
    for level in range(n):  # full columns (level n) take nothing
        unit = base**level
        next_unit = unit * base
        following = defaultdict(int)
        for key, ways in partial.items():
            key, moving_up = divmod(key, side)
            state, left = divmod(key, side)
            upper, lower = divmod(state, next_unit)
            here = lower // unit
            room_above = digit_sums.get(upper)  # columns later levels can still give
            if room_above is None:
                room_above = digit_sums[upper] = sum(_digits(upper, base, n + 1)) - state // top
            row = binomial[here]
            for x in range(max(0, left - room_above), min(left, here) + 1):
                moved = state + (moving_up - x) * unit
                if x == left:  # the row is placed: the x columns land one level up
                    done[moved + x * next_unit] += ways * row[x]
                else:
                    following[(moved * side + left - x) * side + x] += ways * row[x]
        partial = following
    return done


def _digits(number, base, count):
    """The ``count`` lowest base-``base`` digits of ``number``, lowest first."""
    out = []
    for _ in range(count):
        number, digit = divmod(number, base)
        out.append(digit)
    return out


def transposable_tile_log10(n, m):
    """Log10 of the transposable tile count: exact where computable, else estimated.

    The estimate is the Canfield-McKay asymptotic formula for dense 0/1 matrices with
    equal line sums, ``C(m, n)**(2m) / C(m*m, n*m) * exp(-1/2)`` (Canfield and McKay,
    2005), in log10. Against the exact count it is within 0.5 % in log10 from m = 8 on at
    50 % density (see ``tests/test_diversity.py``), and improves with m.

    Parameters
    ----------
    n, m : int
        Kept per row and column, and the tile size.

    Returns
    -------
    float
        The log10 of the number of m x m 0/1 matrices with ``n`` ones per row and column.

    Examples
    --------
    >>> round(10 ** transposable_tile_log10(2, 4))
    90
    """
    n, m = parse_pattern(n, m)
    if _tile_count_is_exact(n, m):
        return math.log10(transposable_tile_count(n, m))
    return 2 * m * _log10_comb(m, n) - _log10_comb(m * m, n * m) - 0.5 * _LOG10_E


def transposable_tile_paper_log10(n, m):
    """Log10 of Hubara et al.'s closed-form approximation for one transposable tile.

    The paper (Section 3) counts N:M by zeros; with ``z = m - n`` zeros per row and column
    it approximates the count by ``m! (m-1)! ... (m-z+1)!``. This is a formula, not a
    count, and it overstates: see the module notes.

    Parameters
    ----------
    n, m : int
        Kept per row and column, and the tile size.

    Returns
    -------
    float
        The log10 of ``m! (m-1)! ... (m-z+1)!``.

    References
    ----------
    Hubara et al., "Accelerated Sparse Neural Training: A Provable and Efficient Method to
    Find N:M Transposable Masks", NeurIPS 2021, section 3.

    Examples
    --------
    >>> round(10 ** transposable_tile_paper_log10(2, 4))  # 4! 3!; the exact count is 90
    144
    >>> f"{10 ** transposable_tile_paper_log10(4, 8):.3g}"  # 8! 7! 6! 5!; exact: 1.17e11
    '1.76e+13'
    """
    n, m = parse_pattern(n, m)
    return sum(math.lgamma(m - k + 1) for k in range(m - n)) * _LOG10_E


def diversity_table(shape, density):
    """Mask diversity of every structure at one density over one tensor.

    Rows: unstructured; row-wise and transposable N:M for M in 2, 4, 8, 16, 32 with
    ``N = density * M`` a whole number, each transposable row followed by Hubara et al.'s
    closed-form approximation (labelled); b x b blocks for b in 2, 4, 8 (those that fit).

    Parameters
    ----------
    shape : int or tuple of int
        As in :func:`mask_diversity`.
    density : float
        Fraction kept, in (0, 1].

    Returns
    -------
    list of (str, MaskDiversity)
        Labels such as ``"4:8 transposable"`` and their diversity, in the order above.

    Examples
    --------
    >>> [label for label, _ in diversity_table((8, 8), 0.5)][:4]
    ['unstructured', '1:2 rowwise', '1:2 transposable', '1:2 transposable (Hubara et al. approx.)']
    """
    density = _density(density, None)
    rows = [("unstructured", mask_diversity("unstructured", shape, density=density))]
    for m in (2, 4, 8, 16, 32):
        n = density * m
        if n != int(n) or not 0 < n < m:
            continue
        for structure in ("rowwise", "transposable"):
            try:
                rows.append((f"{int(n)}:{m} {structure}", mask_diversity(structure, shape, (int(n), m))))
            except ValueError:
                continue  # this shape does not tile
            if structure == "transposable":
                rows.append((f"{int(n)}:{m} transposable (Hubara et al. approx.)",
                             mask_diversity(structure, shape, (int(n), m), approximation="hubara2021")))
    for b in (2, 4, 8):
        try:
            rows.append((f"block {b}x{b}", mask_diversity("block", shape, density=density, block=b)))
        except ValueError:
            pass
    return rows


def _tile_count_is_exact(n, m):
    return m <= EXACT_MAX_M or min(n, m - n) <= EXACT_SMALL_SIDE


def _log10_comb(total, chosen):
    return (math.lgamma(total + 1) - math.lgamma(chosen + 1) - math.lgamma(total - chosen + 1)) * _LOG10_E


def _density(density, pattern):
    if density is None:
        if pattern is None:
            raise ValueError("give density=... (fraction kept) or a pattern such as '2:4'")
        density = parse_pattern(pattern).density
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], the fraction of weights kept, got {density!r}")
    return float(density)


def _size_and_dims(shape):
    if isinstance(shape, bool):
        raise TypeError(f"shape must be a size or a tuple of sizes, got {shape!r}")
    if isinstance(shape, int):
        dims = None
        size = shape
    else:
        dims = tuple(shape)
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise TypeError(f"shape must be a size or a tuple of integer sizes, got {shape!r}")
        if len(dims) == 1:
            raise ValueError(f"shape {dims} has one dimension; give (out, in[, *kernel]) or a size")
        size = math.prod(dims)
    if size < 1 or (dims and min(dims) < 1):
        raise ValueError(f"shape must hold at least one weight, got {shape!r}")
    return size, dims


def _check_divides(size, dims, m, axes, what):
    if dims is None:
        unit = m * m if len(axes) == 2 else m
        if size % unit:
            raise ValueError(f"{size} weights do not split into {what} ({unit} weights each); "
                             f"give a shape or a size that is a multiple of {unit}")
        return
    error = tiling_error(dims, m, transposable=len(axes) == 2, hint=f"shape {dims} does not split into {what}")
    if error is not None:
        raise error
