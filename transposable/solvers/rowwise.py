"""Row-wise N:M masks: keep the ``n`` largest magnitudes of every group of ``m``."""
import numpy as np

from ._common import always, compute_dtype, is_torch

ACCEPTS_TORCH = True
EXACT = True
supports = always


def solve(groups, n):
    """Optimal row-wise N:M masks of a batch of groups.

    Parameters
    ----------
    groups : ndarray or Tensor, shape (G, m)
        Weights, one group of ``m`` per row.
    n : int
        Entries kept in every group, ``0 < n < m``.

    Returns
    -------
    ndarray or Tensor of bool, shape (G, m)
        Same kind and device as ``groups``.

    Notes
    -----
    Exact: the ``n`` largest magnitudes of a group are its best choice. Ties go to the
    lowest index. NumPy arrays and CPU tensors go to a compiled kernel (``O(G * m**2)``
    branch-free comparisons, in parallel over groups; no copy of a float32 or float64
    input, only the mask is allocated); tensors on an accelerator are ranked there by a
    stable ``torch.argsort``.

    Examples
    --------
    >>> import numpy as np
    >>> solve(np.array([[1., -3, 3, 0]]), 2).astype(int)
    array([[0, 1, 1, 0]])
    """
    if is_torch(groups):
        import torch

        if groups.device.type != "cpu":
            return solve_in_torch(groups, n)
        exact_dtype = torch.float64 if groups.dtype == torch.float64 else torch.float32  # no ordering changes
        return torch.from_numpy(solve(groups.detach().to(exact_dtype).numpy(), n))
    from ._jit import announce_compile, in_parallel
    from ._rowwise_kernels import keep_largest

    groups = compute_dtype(np.asarray(groups))
    mask = np.empty(groups.shape, dtype=bool)
    with announce_compile("row-wise masks"):
        in_parallel(keep_largest, groups.shape[0], groups, n, mask)
    return mask


def solve_in_torch(groups, n):
    """:func:`solve` in torch operations, on any device: the same masks.

    Tensors on accelerators take it; so does code that ``torch.compile`` traces (the backward
    masks of sparse training), which the compiled CPU kernel would break. Ties go to the
    lowest index, as in :func:`solve`.

    Parameters
    ----------
    groups : Tensor, shape (G, m)
        Weights, one group of ``m`` per row.
    n : int
        Entries kept in every group, ``0 < n < m``.

    Returns
    -------
    Tensor of bool, shape (G, m)
        On the device of ``groups``.

    Examples
    --------
    >>> import torch
    >>> solve_in_torch(torch.tensor([[1., -3, 3, 0]]), 2).int()
    tensor([[0, 1, 1, 0]], dtype=torch.int32)
    """
    import torch

    top = torch.argsort(-groups.abs(), dim=1, stable=True)[:, :n]
    return torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(1, top, True)
