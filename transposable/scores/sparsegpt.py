"""SparseGPT (Frantar and Alistarh, ICML 2023): the optimal-brain-surgeon saliency
``W_ij**2 / [H^-1]_jj**2`` with ``H = X^T X``, masks chosen M columns at a time on the weights
as already updated, every pruned weight's error spread over the columns not yet processed.

Transposable masks fit its column order: the M columns processed together form a slab of
M x M tiles down the rows, whose exact transposable mask is solved on the slab's scores (the
combination TSENOR plugs into layer-wise pruning; Meng et al., 2025).
"""
from ..masks import mask
from ..patterns import parse_pattern
from .base import Option, dampened

NEEDS = frozenset({"hessian"})
LINEAR_ONLY = True
CHANGES_BIAS = False
OPTIONS = {"dampening": Option(0.01, "added to the diagonal of H, as a fraction of its mean", "non-negative")}


def importance(weight, stats, options):
    """Return the saliency before any update, ``w**2 / [H^-1]_jj``.

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        The layer's weight in the ``(out, in)`` convention, any float dtype.
    stats : LayerStatistics
        The layer's calibration statistics (``hessian`` and ``tokens``).
    options : mapping
        The score's options (``dampening``).

    Returns
    -------
    Tensor, shape (out, in)
        Non-negative, in ``weight``'s dtype.

    Examples
    --------
    >>> import torch
    >>> from transposable.scores.base import LayerStatistics
    >>> stats = LayerStatistics(NEEDS)
    >>> stats.add(torch.eye(2))
    >>> saliency = importance(torch.tensor([[2.0, 1.0]], dtype=torch.float64), stats, {"dampening": 0.0})
    >>> [round(v, 9) for v in saliency[0].tolist()]  # H = I/2 (2 tokens): w**2 / 2
    [2.0, 0.5]
    """
    import torch

    h, _ = dampened(stats.hessian / max(stats.tokens, 1), options["dampening"])
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return weight.pow(2) / torch.diag(inverse).to(weight)[None, :]


def input_priority(stats):
    """Return the Hessian's diagonal: the inputs SparseGPT is best given first.

    SparseGPT prunes a layer's inputs in order and spreads each error over those still to
    come, so the channel permutations place the heaviest inputs first.

    Parameters
    ----------
    stats : LayerStatistics
        The layer's calibration statistics (``hessian``).

    Returns
    -------
    Tensor, shape (in,)
        The diagonal of ``X^T X``.

    Examples
    --------
    >>> import torch
    >>> from transposable.scores.base import LayerStatistics
    >>> stats = LayerStatistics(NEEDS)
    >>> stats.add(torch.tensor([[1.0, 3.0]]))
    >>> input_priority(stats).tolist()
    [1.0, 9.0]
    """
    import torch

    return torch.diag(stats.hessian)


def prune(layer, weight, stats, recipe):
    """Run :func:`sparsegpt` on the layer's Hessian (its factor shared by the layers that read the same inputs).

    Parameters
    ----------
    layer : nn.Module
        The layer (its parameters are not changed here).
    weight : Tensor, shape (out, in)
        The layer's weight in the ``(out, in)`` convention, float32.
    stats : LayerStatistics
        The layer's calibration statistics (``hessian`` and ``tokens``).
    recipe : PruneRecipe
        The pattern, solver and options.

    Returns
    -------
    keep : Tensor of bool, shape (out, in)
        The mask.
    weight : Tensor or None
        The reconstructed weight, float32.
    bias : Tensor or None
        None: unchanged.

    Examples
    --------
    >>> import torch
    >>> from transposable.prune import PruneRecipe
    >>> from transposable.scores.base import LayerStatistics
    >>> _ = torch.manual_seed(0)
    >>> stats = LayerStatistics(NEEDS)
    >>> stats.add(torch.randn(64, 8))
    >>> keep, new, bias = prune(None, torch.randn(8, 8), stats, PruneRecipe("2:4"))
    >>> int(keep.sum()), bool((new[~keep] == 0).all())
    (32, True)
    """
    dampening = recipe.options["dampening"]
    factor = stats.derived(("sparsegpt", dampening),
                           lambda: inverse_factor(stats.hessian / max(stats.tokens, 1), dampening))
    new, keep = _reconstruct(weight, *factor, recipe.pattern, recipe.transposable, recipe.method)
    return keep, new, None


def sparsegpt(weight, hessian, pattern, *, transposable=True, method="auto", dampening=0.01, blocksize=128):
    """SparseGPT: an N:M mask and the reconstructed weights of one linear layer.

    Columns are processed in order. Every M columns the mask of that slab is chosen on the
    weights as already updated, by the saliency ``w**2 / [H^-1]_jj**2`` (for transposable
    masks: the exact transposable mask of the slab's M x M tiles); each pruned weight's
    error is then spread over the columns still to come along the Cholesky factor of
    ``H^-1`` (optimal brain surgeon, with lazy block updates).

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        The layer's weight (any float dtype; computed in float32).
    hessian : Tensor, shape (in, in)
        ``X^T X / tokens`` of the layer's calibration inputs.
    pattern : str, tuple or Pattern
        The N:M pattern.
    transposable : bool, default True
        Transposable masks (``out`` must be a multiple of M) instead of row-wise ones.
    method : str, default "auto"
        The transposable solver.
    dampening : float, default 0.01
        Added to the diagonal of ``H`` as a fraction of its mean (numerical stability).
    blocksize : int, default 128
        Columns per lazy update (rounded down to a multiple of M).

    Returns
    -------
    weight : Tensor, shape (out, in)
        Reconstructed, float32, zero where pruned.
    mask : Tensor of bool, shape (out, in)
        The mask (N:M along ``in``; transposable if asked).

    References
    ----------
    Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML 2023.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 16)
    >>> w = torch.randn(8, 16)
    >>> new, keep = sparsegpt(w, x.t() @ x / 256, "2:4")
    >>> error = lambda v: float((x @ (v - w).t()).pow(2).sum())
    >>> bool(error(new) < error(w * keep)), int(keep.sum())
    (True, 64)
    """
    return _reconstruct(weight, *inverse_factor(hessian, dampening), pattern, transposable, method, blocksize)


def inverse_factor(hessian, dampening):
    """The upper Cholesky factor of the dampened ``H^-1`` (float32) and the dead inputs.

    What SparseGPT needs of a Hessian, computed once for every layer that reads the same
    inputs (q, k and v; gate and up).

    Parameters
    ----------
    hessian : Tensor, shape (in, in)
        ``X^T X / tokens``.
    dampening : float
        Added to the diagonal as a fraction of its mean.

    Returns
    -------
    factor : Tensor, shape (in, in)
        Upper triangular, float32, on ``hessian``'s device.
    dead : Tensor of bool, shape (in,)
        Inputs that are always zero.

    Examples
    --------
    >>> import torch
    >>> factor, dead = inverse_factor(torch.eye(3) * 4, 0.0)
    >>> factor.diag().tolist(), dead.tolist()
    ([0.5, 0.5, 0.5], [False, False, False])
    """
    import torch

    h, dead = dampened(hessian.detach().to(torch.float64 if hessian.device.type == "cpu" else torch.float32),
                        dampening)
    h = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h, upper=True).float(), dead


def _reconstruct(weight, h_inv, dead, pattern, transposable, method, blocksize=128):
    """SparseGPT's column walk on ``weight`` given :func:`inverse_factor`'s output."""
    import torch

    pattern = parse_pattern(pattern)
    m = pattern.m
    w = weight.detach().clone().float()
    columns = w.shape[1]
    w[:, dead] = 0
    keep = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    step = max(m, blocksize // m * m)
    for first in range(0, columns, step):
        last = min(first + step, columns)
        block, block_inv = w[:, first:last].clone(), h_inv[first:last, first:last]
        errors = torch.zeros_like(block)
        for i in range(last - first):
            if i % m == 0:
                slab = block[:, i:i + m]
                saliency = slab.pow(2) / torch.diag(block_inv)[i:i + m].pow(2)
                keep[:, first + i:first + i + m] = mask(slab, pattern, transposable=transposable, method=method,
                                                        scores=saliency)
            column = block[:, i]
            kept = column * keep[:, first + i]
            error = (column - kept) / block_inv[i, i]
            # In place (rank-1 and matrix updates without temporaries): per-column
            # temporaries of out x blocksize fragment the heap (measured: +25 % peak).
            block[:, i:].addr_(error, block_inv[i, i:], alpha=-1)
            block[:, i] = kept
            errors[:, i] = error
        w[:, first:last] = block
        w[:, last:].addmm_(errors, h_inv[first:last, last:], alpha=-1)
    return w * keep, keep
