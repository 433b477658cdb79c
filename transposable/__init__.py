"""transposable: N:M and transposable N:M sparsity masks for PyTorch and NumPy weights.

N:M keeps ``n`` of every ``m`` consecutive weights along a layer's input dimension; a
*transposable* N:M mask keeps ``n`` in every row and column of every ``m x m`` tile, so the
weight and its transpose are both N:M and both the forward and the backward GEMM can use
sparse tensor cores.
"""
__version__ = "0.1.0"

from .masks import (  # noqa: E402
    METHODS,
    is_nm_sparse,
    is_transposable_nm,
    kept_fraction,
    nm_mask,
    ratio_to_optimum,
    transposable_mask,
)
from .patterns import Pattern, parse_pattern  # noqa: E402

__all__ = [
    "METHODS",
    "Pattern",
    "is_nm_sparse",
    "is_transposable_nm",
    "kept_fraction",
    "nm_mask",
    "parse_pattern",
    "ratio_to_optimum",
    "transposable_mask",
]
