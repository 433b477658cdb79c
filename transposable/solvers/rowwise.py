"""Row-wise N:M masks: keep the ``n`` largest magnitudes of every group of ``m``."""
import numpy as np

from ._common import always, is_torch

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
    lowest index (a stable sort). ``O(G * m log m)``.

    Examples
    --------
    >>> import numpy as np
    >>> solve(np.array([[1., -3, 3, 0]]), 2).astype(int)
    array([[0, 1, 1, 0]])
    """
    if is_torch(groups):
        import torch

        top = torch.argsort(-groups.abs(), dim=1, stable=True)[:, :n]
        return torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(1, top, True)
    top = np.argsort(-np.abs(groups), axis=1, kind="stable")[:, :n]
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=1)
    return mask
