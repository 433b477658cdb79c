"""N:M patterns: ``"2:4"`` strings or ``(n, m)`` integers, validated once."""
import operator
from typing import NamedTuple


class Pattern(NamedTuple):
    """Keep ``n`` of every ``m`` consecutive weights (the count NVIDIA and Zhou et al. use).

    Hubara et al. write N:M with N the number of *zeros*; at 50 % (2:4, 4:8, ...) the two
    conventions name the same pattern.

    Parameters
    ----------
    n : int
        Weights kept per group, ``0 < n < m``.
    m : int
        Group (and tile) size.

    Examples
    --------
    >>> p = Pattern(2, 4)
    >>> str(p), p.density
    ('2:4', 0.5)
    """

    n: int
    m: int

    def __str__(self):
        return f"{self.n}:{self.m}"

    @property
    def density(self):
        """Fraction of weights kept, ``n / m``."""
        return self.n / self.m


def parse_pattern(n, m=None):
    """Validate an N:M pattern given as ``"N:M"``, ``(n, m)``, or two integers.

    Parameters
    ----------
    n : str, int, tuple or Pattern
        ``"2:4"``, a ``(2, 4)`` pair or ``Pattern``, or the kept count with ``m`` given.
    m : int, optional
        Group size, when ``n`` is an integer.

    Returns
    -------
    Pattern
        The validated ``(n, m)``.

    Raises
    ------
    TypeError
        If the values are not integers or an ``"N:M"`` string.
    ValueError
        If the string is malformed or the pattern breaks ``0 < n < m``.

    Examples
    --------
    >>> parse_pattern("2:4")
    Pattern(n=2, m=4)
    >>> parse_pattern(4, 8).density
    0.5
    """
    if isinstance(n, str):
        if m is not None:
            raise TypeError(f"give the pattern as '{n}' or as two integers, not both (got m={m!r})")
        parts = n.split(":")
        try:
            n, m = (int(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            n = None
        if n is None:
            raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {':'.join(parts)!r}")
    elif isinstance(n, tuple):
        if m is not None or len(n) != 2:
            raise TypeError(f"a pattern tuple is (n, m), got {n!r}" + (f" and m={m!r}" if m is not None else ""))
        n, m = n
    elif m is None:
        raise TypeError(f"m is missing: give the pattern as 'N:M' or as n and m, got n={n!r}")
    n, m = _integer("n", n), _integer("m", m)
    if m < 2:
        raise ValueError(f"m must be at least 2, got m={m}")
    if not 0 < n < m:
        raise ValueError(f"n must satisfy 0 < n < m, got n={n}, m={m}")
    return Pattern(n, m)


def _integer(name, value):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
