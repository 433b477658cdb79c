"""Mask engines: a batch of tiles ``(K, m, m)`` or groups ``(G, m)`` in, a bool array out.

Every engine module exposes the same interface, so tests and benchmarks can loop over
the registries below:

``solve(tiles, n, **options) -> bool ndarray``
    Keep ``n`` entries of every tile row and tile column (transposable engines) or of
    every group (row-wise engine), maximising the kept sum of ``|tiles|``.
``EXACT``
    Whether ``solve`` returns an optimal mask.
``ACCEPTS_TORCH``
    Whether ``solve`` takes torch tensors and computes on their device (otherwise it
    takes NumPy arrays).
``supports(n, m)``
    ``None`` when the engine handles the pattern, else a sentence saying why not.

Engines know nothing about files, modules or weight layouts; ``transposable`` does that.
NumPy is enough to use them.
"""
from . import cyclecanceling, exhaustive, greedy, mincostflow, rowwise
from ._common import is_torch
from .mincostflow import MinCostFlowError

#: Engines for transposable N:M masks, by method name.
TRANSPOSABLE = {
    "cyclecanceling": cyclecanceling,
    "exhaustive": exhaustive,
    "greedy": greedy,
    "mincostflow": mincostflow,
}

__all__ = ["TRANSPOSABLE", "MinCostFlowError", "cyclecanceling", "exhaustive", "greedy", "is_torch", "mincostflow",
           "rowwise"]
