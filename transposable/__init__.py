"""transposable: N:M and transposable N:M sparsity masks for PyTorch and NumPy weights.

N:M keeps ``n`` of every ``m`` consecutive weights along a layer's input dimension; a
*transposable* N:M mask keeps ``n`` in every row and column of every ``m x m`` tile, so the
weight and its transpose are both N:M and both the forward and the backward GEMM can use
sparse tensor cores.

The names below are imported on first use, so ``import transposable`` (and the
``transposable`` command's start-up) costs next to nothing; NumPy, numba, torch and OR-Tools
load when a function that needs them is called.
"""
import importlib

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "METHODS": ".masks",
    "mask": ".masks",
    "nm_mask": ".masks",
    "transposable_mask": ".masks",
    "is_nm_sparse": ".masks",
    "is_transposable_nm": ".masks",
    "kept_fraction": ".masks",
    "ratio_to_optimum": ".masks",
    "TilingError": ".layout",
    "Pattern": ".patterns",
    "parse_pattern": ".patterns",
    "MinCostFlowError": ".solvers.mincostflow",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'transposable' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
