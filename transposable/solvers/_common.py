"""Helpers shared by the engines (kept free of torch imports)."""
import numpy as np

#: Tiles whose largest magnitude is at least ``2**SCALE_ABOVE`` are scaled down by a power
#: of two before solving: sums of up to m*m such entries would overflow float64 near 1e308.
SCALE_ABOVE = 512


def is_torch(x):
    """Whether ``x`` is a torch tensor, told without importing torch.

    Parameters
    ----------
    x : object
        Anything.

    Returns
    -------
    bool
        True for a ``torch.Tensor`` (and its subclasses from torch).

    Examples
    --------
    >>> import numpy as np
    >>> is_torch(np.zeros(2))
    False
    """
    return type(x).__module__.startswith("torch")


def compute_dtype(array):
    """``array`` as float32 or float64 (numba kernels are compiled for those two);
    float16 -> float32 is exact, so no ordering changes."""
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)


def always(n, m):
    """``supports`` for engines that handle every pattern."""
    return None


def as_grid(tiles):
    """A tile grid ``(A, m, B, m)`` view of ``(K, m, m)`` tiles (or of a grid)."""
    return tiles[:, :, None, :] if tiles.ndim == 3 else tiles


def contiguous_grid(tiles):
    """NumPy ``tiles`` as a C-contiguous float32 or float64 grid ``(A, m, B, m)``: one
    compiled specialization per dtype (a strided input is copied once, rather than compiling
    the kernels again for it)."""
    return np.ascontiguousarray(as_grid(compute_dtype(np.asarray(tiles))))


def as_tiles(tiles):
    """``(K, m, m)`` tiles of a grid ``(A, m, B, m)`` (a copy), or the tiles themselves."""
    if tiles.ndim == 3:
        return tiles
    a, m, b, _ = tiles.shape
    swapped = tiles.permute(0, 2, 1, 3) if is_torch(tiles) else tiles.transpose(0, 2, 1, 3)
    return swapped.reshape(a * b, m, m)


def shaped_like(result, tiles):
    """``result`` (tiles or a grid) in the shape ``tiles`` came in."""
    if result.ndim == tiles.ndim:
        return result
    if tiles.ndim == 3:  # a grid (K, m, 1, m) back to tiles
        return result.reshape(tiles.shape)
    a, m, b, _ = tiles.shape
    grid = result.reshape(a, b, m, m)
    return (grid.permute(0, 2, 1, 3) if is_torch(grid) else grid.transpose(0, 2, 1, 3)).reshape(tiles.shape)


def greedy_then_improve(tiles, n, rounds, exact, rowwise_first=False):
    """Greedy, completion, then ``rounds`` of 2-opt or, if ``exact``, cycle canceling: with
    numba on NumPy tiles, with torch on a tensor's own device; same shape out. With
    ``rowwise_first`` (exact, NumPy), a tile whose row-wise best mask is transposable takes it."""
    if is_torch(tiles):
        from . import _torch_tiles

        return shaped_like(_torch_tiles.solve(as_tiles(tiles), n, rounds, exact), tiles)
    from ._jit import announce_compile, in_parallel
    from ._tile_kernels import exact_grid, greedy_grid, rowwise_first_grid

    grid = contiguous_grid(tiles)
    mask = np.empty(grid.shape, dtype=bool)
    float64_order = grid.dtype == np.float64
    if exact:
        with announce_compile("cycle canceling"):
            in_parallel(rowwise_first_grid if rowwise_first else exact_grid, grid.shape[0], grid, n, float64_order,
                        mask)
    else:
        with announce_compile("greedy"):
            in_parallel(greedy_grid, grid.shape[0], grid, n, rounds, float64_order, mask)
    return shaped_like(mask, tiles)
