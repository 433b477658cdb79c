"""Helpers shared by the engines (kept free of torch imports)."""
import numpy as np


def is_torch(x):
    """True for a torch tensor, without importing torch."""
    return type(x).__module__.startswith("torch")


def magnitudes(tiles):
    """``|tiles|`` as a float32/float64 NumPy array (numba and OR-Tools need one of those)."""
    a = np.abs(np.asarray(tiles))
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)  # float16 -> float32 is exact, so the ordering is kept
    return a


def always(n, m):
    """``supports`` for engines that handle every pattern."""
    return None
