"""ALPS (Meng et al., NeurIPS 2024): layer-wise reconstruction by ADMM, with the library's exact
(transposable) N:M projection.

It minimises the layer's output error on the calibration inputs, ``||X W0^T - X W^T||^2 =
tr((W - W0) H (W - W0)^T)`` with ``H = X^T X``, over weights ``W`` of the N:M (or transposable
N:M) pattern, by splitting ``W = D``:

- ``W`` update: ``W = (W0 H + rho D - V) (H + rho I)^-1``, through one eigendecomposition of
  ``H`` (shared by the layers that read the same inputs), for any ``rho``;
- ``D`` update: the projection of ``W + V / rho`` onto the pattern, which is exactly the mask
  problem on the squared entries: the exact solvers give the exact projection, transposable
  tiles included;
- ``V`` update: ``V + rho (W - D)``; ``rho`` grows every iteration, the faster the more of the
  support changed, until the support stands still;

then a few preconditioned conjugate-gradient steps minimise the error on the final support.
"""
from .. import solvers
from ..masks import mask, resolve_method
from .base import Option, dampened
from .sparsegpt import importance  # noqa: F401  (the permutations rank by the same saliency)

NEEDS = frozenset({"hessian"})
LINEAR_ONLY = True
CHANGES_BIAS = False
OPTIONS = {"dampening": Option(0.01, "added to the diagonal of H, as a fraction of its mean", "non-negative"),
           "rho": Option(0.1, "ADMM's first penalty, relative to H's mean diagonal", "positive"),
           "iterations": Option(300, "most ADMM iterations per layer", "positive integer"),
           "pcg_steps": Option(20, "conjugate-gradient steps on the final support", "positive integer")}

#: rho's growth per iteration, by how much of the support the iteration changed: at least 10 %,
#: 0.5 %, one entry, none (Meng et al.'s schedule, applied every iteration).
GROWTH = (1.3, 1.2, 1.1, 1.05)

#: Iterations the support must stand still, with ``||W - D|| <= TOLERANCE ||W||``, to stop.
SETTLED, TOLERANCE = 5, 1e-3


def input_priority(stats):
    """Return None: ALPS treats a layer's inputs all at once, in no order.

    Parameters
    ----------
    stats : LayerStatistics
        The layer's calibration statistics (unused).

    Returns
    -------
    None
        Always.

    Examples
    --------
    >>> input_priority(None) is None
    True
    """
    return None


def prune(layer, weight, stats, recipe):
    """Run :func:`alps` on the layer's Hessian (its eigendecomposition shared by the layers that read the same inputs).

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
    weight : Tensor
        The reconstructed weight, float32, zero where pruned.
    bias : None
        Unchanged.

    Examples
    --------
    >>> import torch
    >>> from transposable.prune import PruneRecipe
    >>> from transposable.scores.base import LayerStatistics
    >>> _ = torch.manual_seed(0)
    >>> stats = LayerStatistics(NEEDS)
    >>> stats.add(torch.randn(64, 8))
    >>> keep, new, bias = prune(None, torch.randn(8, 8), stats, PruneRecipe("2:4", score="alps"))
    >>> int(keep.sum()), bool((new[~keep] == 0).all())
    (32, True)
    """
    options = recipe.options
    basis = stats.derived(("alps", options["dampening"]),
                          lambda: eigenbasis(stats.hessian / max(stats.tokens, 1), options["dampening"]))
    new, keep = _admm(weight, *basis, recipe.pattern, recipe.transposable, recipe.method, options["rho"],
                      options["iterations"], options["pcg_steps"])
    return keep, new, None


def alps(weight, hessian, pattern, *, transposable=True, method="auto", dampening=0.01, rho=0.1, iterations=300,
         pcg_steps=20):
    """ALPS: an N:M mask and the reconstructed weights of one linear layer, by ADMM.

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
        The solver of each projection (exact by default).
    dampening : float, default 0.01
        Added to the diagonal of ``H`` as a fraction of its mean.
    rho : float, default 0.1
        The first ADMM penalty, relative to ``H``'s mean diagonal.
    iterations : int, default 300
        Most ADMM iterations (it stops once the support stands still).
    pcg_steps : int, default 20
        Conjugate-gradient steps on the final support.

    Returns
    -------
    weight : Tensor, shape (out, in)
        Reconstructed, float32, zero where pruned.
    mask : Tensor of bool, shape (out, in)
        The mask (N:M along ``in``; transposable if asked).

    Notes
    -----
    Cost per iteration: two ``out x in x in`` matrix products and one exact projection (the
    mask of ``out x in`` squared entries); one ``in x in`` eigendecomposition per Hessian.

    References
    ----------
    Meng, Behdin, Wang and Mazumder, "ALPS: Improved Optimization for Highly Sparse One-Shot
    Pruning for Large Language Models", NeurIPS 2024. Meng et al., "TSENOR", NeurIPS 2025
    (transposable masks in layer-wise pruning).

    Examples
    --------
    >>> import torch
    >>> from transposable.scores.sparsegpt import sparsegpt
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 16) @ torch.randn(16, 16)  # correlated inputs
    >>> w = torch.randn(8, 16)
    >>> error = lambda v: float((x @ (v - w).t()).pow(2).sum())
    >>> new, keep = alps(w, x.t() @ x / 256, "2:4", transposable=False)
    >>> bool(error(new) < error(sparsegpt(w, x.t() @ x / 256, "2:4", transposable=False)[0])), int(keep.sum())
    (True, 64)
    """
    from ..patterns import parse_pattern

    basis = eigenbasis(hessian, dampening)
    return _admm(weight, *basis, parse_pattern(pattern), transposable, method, rho, iterations, pcg_steps)


def eigenbasis(hessian, dampening):
    """The dampened Hessian scaled to a unit mean diagonal, and its eigendecomposition.

    Parameters
    ----------
    hessian : Tensor, shape (in, in)
        ``X^T X / tokens``.
    dampening : float
        Added to the diagonal as a fraction of its mean.

    Returns
    -------
    h : Tensor, shape (in, in)
        The scaled matrix, float32.
    eigenvalues : Tensor, shape (in,)
        Float32.
    eigenvectors : Tensor, shape (in, in)
        Float32, orthonormal columns.

    Examples
    --------
    >>> import torch
    >>> h, values, vectors = eigenbasis(torch.diag(torch.tensor([1.0, 3.0])), 0.0)
    >>> h.diag().tolist(), values.tolist()
    ([0.5, 1.5], [0.5, 1.5])
    """
    import torch

    h, _ = dampened(hessian.detach().to(torch.float64), dampening)  # eigh in float64: exact enough
    h = h / torch.diag(h).mean()
    values, vectors = torch.linalg.eigh(h)
    return h.float(), values.float(), vectors.float()


def _admm(weight, h, values, vectors, pattern, transposable, method, rho, iterations, pcg_steps):
    w0 = weight.detach().float()
    target = w0 @ h  # W0 H
    keep = _project(w0, pattern, transposable, method)
    d = w0 * keep
    v = w0.new_zeros(w0.shape)
    size, settled = int(keep.sum()), 0
    for _ in range(iterations):
        w = (((target + rho * d - v) @ vectors) / (values + rho)) @ vectors.t()
        z = w + v / rho
        new = _project(z, pattern, transposable, method)
        changed = int((new != keep).sum())
        keep, d = new, z * new
        v += rho * (w - d)
        rho *= GROWTH[0] if changed >= 0.1 * size else GROWTH[1] if changed >= 0.005 * size else \
            GROWTH[2] if changed else GROWTH[3]
        settled = settled + 1 if not changed else 0
        if settled >= SETTLED and float((w - d).norm()) <= TOLERANCE * float(w.norm()):
            break
    return _conjugate_gradient(d, target, h, keep, pcg_steps), keep


def _project(z, pattern, transposable, method):
    """The support of the nearest N:M matrix to ``z``: the mask keeping most of ``z**2``.

    Transposable: a tile whose row-wise best mask keeps at most N per column takes it (no
    transposable mask keeps more than the row-wise best, so that one is exact); only the other
    tiles go to the solver. Late in ADMM most tiles are such (70-80 % at 8:16), and the
    projection is most of an iteration's time at 4:8 and 8:16. With cycle canceling on the CPU
    (``"auto"`` for M > 5) all of it is one compiled pass; other solvers (and ``"auto"``'s
    exhaustive one at 2:4, whose choice among tied optima the compiled pass would not repeat)
    get the tiles the row-wise mask leaves.
    """
    import torch

    scores = z * z
    m = pattern.m
    grid = (z.shape[0] // m, m, z.shape[1] // m, m)
    if transposable and z.device.type == "cpu" and resolve_method(method, pattern) == "cyclecanceling":
        return torch.from_numpy(solvers.cyclecanceling.solve(scores.reshape(grid).numpy(), pattern.n,
                                                             rowwise_first=True)).reshape(z.shape)
    rowwise = mask(z, pattern, transposable=False, scores=scores)
    if not transposable:
        return rowwise
    tiles = rowwise.reshape(grid).transpose(1, 2)  # (out / m, in / m, m, m), a view of rowwise
    unsolved = (tiles.sum(dim=2) > pattern.n).any(dim=2)
    if unsolved.any():
        stacked = scores.reshape(grid).transpose(1, 2)[unsolved].reshape(-1, m)  # the tiles, one under another
        tiles[unsolved] = mask(stacked, pattern, transposable=True, method=method).reshape(-1, m, m)
    return rowwise


def _conjugate_gradient(w, target, h, keep, steps):
    """Minimise ``tr((W - W0) H (W - W0)^T)`` over ``W`` on the support ``keep``, from ``w``:
    every row's system ``H_SS w_S = (W0 H)_S`` by preconditioned CG (Jacobi), all rows at once."""
    support = keep.to(w.dtype)
    x = w * support
    r = (target - x @ h) * support
    inverse_diagonal = 1 / h.diagonal()
    z = r * inverse_diagonal
    p = z.clone()
    rz = (r * z).sum(dim=1, keepdim=True)
    for _ in range(steps):
        hp = (p @ h) * support
        alpha = rz / (p * hp).sum(dim=1, keepdim=True).clamp_min(1e-30)
        x += alpha * p
        r -= alpha * hp
        z = r * inverse_diagonal
        rz_next = (r * z).sum(dim=1, keepdim=True)
        p = z + rz_next / rz.clamp_min(1e-30) * p
        rz = rz_next
    return x * support
