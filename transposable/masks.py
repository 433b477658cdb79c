"""N:M and transposable N:M masks for weight tensors, their checkers and quality metrics.

Axis convention: a weight ``(out, in)`` (``nn.Linear``) or ``(out, in, *kernel)``
(``nn.Conv``; every kernel tap is an ``(out, in)`` matrix). Row-wise groups of ``m``
run along ``in``; transposable ``m x m`` tiles cover ``(out, in)`` and keep exactly ``n``
per tile row and per tile column, so that ``W`` is N:M along ``in`` and ``W.T`` is N:M
along ``out``.
"""
import numpy as np

from . import solvers
from .solvers import is_torch

from .layout import Layout
from .patterns import parse_pattern

#: Method names accepted by :func:`mask` for transposable masks (row-wise masks have one
#: exact method, ``"auto"``).
METHODS = ("auto", *sorted(solvers.TRANSPOSABLE))

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def mask(weight, pattern, *, transposable, method="auto", pad=False, scores=None):
    """The best N:M mask of a weight: row-wise, or transposable.

    The library's one mask entry point; :func:`nm_mask` and :func:`transposable_mask` are
    it with ``transposable`` fixed.

    Parameters
    ----------
    weight : ndarray or Tensor, shape (out, in) or (out, in, *kernel)
        Float weights (float16, bfloat16, float32 or float64). Row-wise groups run along
        ``in`` (axis 1), transposable tiles cover ``(out, in)``, for every kernel tap.
    pattern : str, tuple or Pattern
        ``"2:4"``, ``(2, 4)``: ``n`` kept of every ``m``.
    transposable : bool
        Keep ``n`` in every row and column of every ``m x m`` tile (``W`` and ``W.T`` both
        N:M) instead of ``n`` in every group of ``m`` along ``in``.
    method : str, default "auto"
        Transposable solver: ``"cyclecanceling"`` (exact), ``"exhaustive"`` (exact,
        m <= 5), ``"greedy"`` (2-approximation improved by 2-opt), ``"mincostflow"``
        (exact, OR-Tools, on the host), or ``"auto"``: ``"exhaustive"`` up to m = 5, else
        ``"cyclecanceling"``. Row-wise masks take ``"auto"`` (they are always exact).
    pad : bool, default False
        Pad the dimensions that are cut (``in``; and ``out`` if transposable) with zeros to
        multiples of ``m``, solve, and crop the mask. Cropped tiles are solved as "at most
        ``n`` per real row and column", so padding never costs a kept slot.
    scores : ndarray or Tensor, optional
        Importance of every weight, of ``weight``'s shape, non-negative and finite (e.g.
        Wanda's ``|W| * ||X_j||`` or SparseGPT's ``W**2 / diag(H^-1)**2``). The mask then
        keeps the largest total score instead of the largest total ``|w|``; the same
        solvers, equally exact. NumPy scores for a tensor (or the reverse) are converted.

    Returns
    -------
    ndarray or Tensor of bool
        True where a weight is kept; the shape, container and device of ``weight``. A
        ``device="meta"`` weight (a model skeleton) gets an empty meta mask of its shape
        after every check that needs no values (pattern, method, dtype, tiling), for
        planning shapes.

    Raises
    ------
    TypeError
        If ``weight`` (or ``scores``) is not a float array/tensor, the pattern is not
        integers, or ``transposable`` or ``pad`` is not a bool.
    ValueError
        If the pattern breaks ``0 < n < m``, ``method`` is unknown or cannot solve the
        pattern, ``weight`` has fewer than 2 dimensions, is empty, or holds NaN/Inf, or
        ``scores`` has another shape, holds NaN/Inf or a negative value.
    TilingError
        (a ``ValueError``) If a cut dimension is not a multiple of ``m`` and ``pad`` is
        False.
    MinCostFlowError
        If OR-Tools does not reach optimality.

    See Also
    --------
    nm_mask : This function with ``transposable=False``.
    transposable_mask : This function with ``transposable=True``.
    is_nm_sparse, is_transposable_nm : Check a mask.

    Notes
    -----
    Maximises the kept ``sum |w|`` (L1). Row-wise: the ``n`` largest of every group (ties
    to the lowest index), ``O(size log m)``. Transposable, per tile, a max-weight
    b-matching, solved exactly as a min-cost flow (Hubara et al. 2021) by OR-Tools or by
    compiled cycle canceling from a greedy warm start, exactly by enumerating the valid
    tiles, or approximately by the greedy completed to exactly ``n`` per row/column.
    Results are deterministic. A tensor on an accelerator is solved there, except by
    ``"mincostflow"``.

    References
    ----------
    Hubara et al., "Accelerated Sparse Neural Training: A Provable and Efficient Method
    to Find N:M Transposable Masks", NeurIPS 2021.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([[4., 3, 0, 0], [3, 4, 0, 0], [0, 0, 1, 2], [0, 0, 2, 1]])
    >>> mask(w, "2:4", transposable=True).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 1, 1],
           [0, 0, 1, 1]])
    >>> mask(w, "1:4", transposable=False).astype(int)
    array([[1, 0, 0, 0],
           [0, 1, 0, 0],
           [0, 0, 0, 1],
           [0, 0, 1, 0]])
    >>> importance = np.array([[1., 9, 1, 1]] * 4)  # keep column 1 wherever allowed
    >>> bool(mask(w, "1:4", transposable=False, scores=importance)[:, 1].all())
    True
    """
    pattern = parse_pattern(pattern)
    name = resolve_method(method, pattern, transposable=transposable)
    check_flag("pad", pad)
    weight = _check_weight(weight)
    if scores is not None:
        weight = _check_scores(scores, weight)
    layout = Layout(weight.shape, pattern.m, transposable=transposable, pad=pad)
    if is_torch(weight) and weight.device.type == "meta":  # a skeleton: plan shapes, solve nothing
        import torch

        return torch.empty(weight.shape, dtype=torch.bool, device="meta")
    if not transposable:
        data = weight.detach() if is_torch(weight) else weight
        return layout.unblock(solvers.rowwise.solve(layout.blocks(data), pattern.n))
    engine = solvers.TRANSPOSABLE[name]
    edge_engine = engine if engine.supports(pattern.n, pattern.m + pattern.n) is None else solvers.cyclecanceling

    def solve(data):
        return layout.unblock(layout.solve_grid(engine, layout.blocks(data), pattern.n, edge_engine))

    if not is_torch(weight):
        return solve(weight)
    data = weight.detach()
    if engine.ACCEPTS_TORCH and data.device.type != "cpu":
        return solve(data)
    # CPU tensors take the compiled NumPy path (faster than torch there); a tensor on an
    # accelerator goes to the host only for engines that cannot run on it.
    import torch

    return torch.from_numpy(np.ascontiguousarray(solve(data.to("cpu", dtype=_host_dtype(data)).numpy()))).to(
        weight.device)


def nm_mask(weight, n, m=None, *, pad=False):
    """Best row-wise N:M mask: the ``n`` largest ``|w|`` of every ``m`` along ``in``.

    :func:`mask` with ``transposable=False``.

    Parameters
    ----------
    weight : ndarray or Tensor, shape (out, in) or (out, in, *kernel)
        Float weights (or importance scores); groups run along ``in`` (axis 1) for every
        kernel tap.
    n : str, int or tuple
        The pattern, ``"2:4"``, ``(2, 4)``, or the kept count with ``m``.
    m : int, optional
        Group size when ``n`` is an integer.
    pad : bool, default False
        Pad ``in`` with zeros to a multiple of ``m``, solve, and crop the mask.

    Returns
    -------
    ndarray or Tensor of bool
        True where a weight is kept; the shape, container and device of ``weight``.

    Raises
    ------
    TypeError, ValueError, TilingError
        As :func:`mask`.

    See Also
    --------
    mask : The one entry point, row-wise or transposable.
    transposable_mask : Transposable N:M masks.

    Examples
    --------
    >>> import numpy as np
    >>> nm_mask(np.array([[1., -4, 3, 2], [0, 1, 0, 2]]), "2:4").astype(int)
    array([[0, 1, 1, 0],
           [0, 1, 0, 1]])
    """
    return mask(weight, parse_pattern(n, m), transposable=False, pad=pad)


def transposable_mask(weight, n, m=None, *, method="auto", pad=False):
    """Best transposable N:M mask: ``n`` kept in every row and column of every m x m tile.

    :func:`mask` with ``transposable=True``: ``mask`` is N:M along ``in`` and its
    transpose is N:M along ``out``.

    Parameters
    ----------
    weight : ndarray or Tensor, shape (out, in) or (out, in, *kernel)
        Float weights (or importance scores); tiles cover ``(out, in)`` for every kernel
        tap.
    n : str, int or tuple
        The pattern, ``"2:4"``, ``(2, 4)``, or the kept count with ``m``.
    m : int, optional
        Tile size when ``n`` is an integer.
    method : str, default "auto"
        The solver, as in :func:`mask`.
    pad : bool, default False
        Pad ``out`` and ``in`` with zeros to multiples of ``m``, solve, and crop the mask
        (cropped tiles keep at most ``n`` per real row and column, as many as they can).

    Returns
    -------
    ndarray or Tensor of bool
        True where a weight is kept; the shape, container and device of ``weight``.

    Raises
    ------
    TypeError, ValueError, TilingError, MinCostFlowError
        As :func:`mask`.

    See Also
    --------
    mask : The one entry point, row-wise or transposable.
    nm_mask : Row-wise N:M masks.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([[4., 3, 0, 0], [3, 4, 0, 0], [0, 0, 1, 2], [0, 0, 2, 1]])
    >>> transposable_mask(w, "2:4").astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 1, 1],
           [0, 0, 1, 1]])
    """
    return mask(weight, parse_pattern(n, m), transposable=True, method=method, pad=pad)


def resolve_method(method, pattern, *, transposable=True):
    """The engine name ``method`` stands for on ``pattern`` (``"auto"`` resolved).

    Parameters
    ----------
    method : str
        A name from :data:`METHODS`, any case.
    pattern : Pattern
        The pattern to be solved (``"exhaustive"`` handles m <= 5 only).
    transposable : bool, default True
        Row-wise masks have one method: ``"auto"`` resolves to ``"rowwise"``.

    Returns
    -------
    str
        An engine name of ``solvers.TRANSPOSABLE``, or ``"rowwise"``.

    Raises
    ------
    ValueError
        If ``method`` is unknown, the engine cannot solve ``pattern``, or a transposable
        solver is asked for a row-wise mask.

    Examples
    --------
    >>> from transposable.patterns import parse_pattern
    >>> resolve_method("auto", parse_pattern("2:4")), resolve_method("AUTO", parse_pattern("4:8"))
    ('exhaustive', 'cyclecanceling')
    >>> resolve_method("auto", parse_pattern("4:8"), transposable=False)
    'rowwise'
    """
    check_flag("transposable", transposable)
    if not transposable and isinstance(method, str) and method.lower() == "rowwise":
        return "rowwise"  # already resolved
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    name = method.lower()
    if not transposable:
        if name != "auto":
            raise ValueError(f"method {name!r} is a transposable solver; row-wise masks are always exact "
                             f"(method='auto'): pass transposable=True (--transposable) or drop the method")
        return "rowwise"
    if name == "auto":
        return "exhaustive" if solvers.exhaustive.supports(*pattern) is None else "cyclecanceling"
    reason = solvers.TRANSPOSABLE[name].supports(*pattern)
    if reason:
        raise ValueError(f"method {name!r} cannot solve pattern {pattern}: {reason}")
    return name


def is_nm_sparse(x, n, m=None, *, axis=1):
    """Whether every group of ``m`` consecutive entries along ``axis`` keeps at most ``n``.

    Parameters
    ----------
    x : ndarray or Tensor
        A mask (True = kept) or a sparse weight (non-zero = kept), at least 2-D.
    n : str, int or tuple
        The pattern, as in :func:`nm_mask`.
    m : int, optional
        Group size when ``n`` is an integer.
    axis : int, default 1
        ``1`` checks ``in`` (what the forward GEMM needs), ``0`` checks ``out`` (what the
        backward GEMM to the input needs). A trailing partial group counts too.

    Returns
    -------
    bool
        True if no group keeps more than ``n``.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions or ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> is_nm_sparse(np.array([[1, 1, 0, 0], [1, 0, 1, 1]]), "2:4")
    False
    >>> is_nm_sparse(np.array([[1, 1, 0, 0], [1, 0, 1, 0]]), "2:4")
    True
    """
    pattern = parse_pattern(n, m)
    kept = _as_numpy_bool(x)
    if kept.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (out, in[, *kernel]), got shape {kept.shape}")
    if not -kept.ndim <= axis < kept.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {kept.shape}")
    kept = np.moveaxis(kept, axis, -1)
    short = -kept.shape[-1] % pattern.m
    kept = np.pad(kept, [(0, 0)] * (kept.ndim - 1) + [(0, short)])
    return bool((kept.reshape(-1, pattern.m).sum(axis=1) <= pattern.n).all())


def is_transposable_nm(x, n, m=None):
    """Whether ``x`` is N:M along ``in`` and ``x.T`` is N:M along ``out``.

    That is, every row and every column of every ``m x m`` tile over ``(out, in)`` (per
    kernel tap) has at most ``n`` non-zeros.

    Parameters
    ----------
    x : ndarray or Tensor
        A mask or a sparse weight, at least 2-D.
    n : str, int or tuple
        The pattern, as in :func:`nm_mask`.
    m : int, optional
        Tile size when ``n`` is an integer.

    Returns
    -------
    bool
        True if both ``x`` and its transpose are N:M.

    Examples
    --------
    >>> import numpy as np
    >>> is_transposable_nm(np.eye(4), "1:4"), is_transposable_nm(np.ones((4, 4)), "2:4")
    (True, False)
    """
    return is_nm_sparse(x, n, m, axis=1) and is_nm_sparse(x, n, m, axis=0)


def kept_fraction(weight, mask):
    """Kept magnitude ``sum |w * mask| / sum |w|`` (1.0 for an all-zero weight).

    Parameters
    ----------
    weight : ndarray or Tensor
        The weights (any shape).
    mask : ndarray or Tensor
        Of ``weight``'s shape; True (non-zero) where kept.

    Returns
    -------
    float
        In [0, 1]; computed relative to ``max |w|``, so it never overflows.

    Examples
    --------
    >>> import numpy as np
    >>> kept_fraction(np.array([[3., -1]]), np.array([[True, False]]))
    0.75
    """
    magnitude = _relative_magnitude(weight)
    total = magnitude.sum()
    return float((magnitude * _as_numpy_bool(mask)).sum() / total) if total else 1.0


def ratio_to_optimum(weight, mask, optimal_mask):
    """Kept magnitude of ``mask`` over that of ``optimal_mask`` (1.0 = optimal).

    Parameters
    ----------
    weight : ndarray or Tensor
        The weights (any shape).
    mask : ndarray or Tensor
        The mask to rate, of ``weight``'s shape.
    optimal_mask : ndarray or Tensor
        The reference, usually an exact method's mask.

    Returns
    -------
    float
        1.0 when both keep the same magnitude (or ``optimal_mask`` keeps none).

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([[3., -1, 2, 2]])
    >>> ratio_to_optimum(w, np.array([[1, 1, 0, 0]]), nm_mask(w, "2:4"))
    0.8
    """
    magnitude = _relative_magnitude(weight)
    best = (magnitude * _as_numpy_bool(optimal_mask)).sum()
    kept = (magnitude * _as_numpy_bool(mask)).sum()
    return float(kept / best) if best else 1.0


def check_flag(name, value):
    """Raise ``TypeError`` unless ``value`` is a bool.

    ``None`` or ``"yes"`` would otherwise be read as false or true without a word.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        Its value.

    Raises
    ------
    TypeError
        Naming the argument and the value.

    Examples
    --------
    >>> check_flag("pad", "yes")
    Traceback (most recent call last):
    ...
    TypeError: pad must be True or False, got 'yes'
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_weight(weight, name="weight"):
    """``weight`` validated, NumPy arrays in native byte order (the kernels need it)."""
    if not (isinstance(weight, np.ndarray) or is_torch(weight)):
        raise TypeError(f"{name} must be a NumPy array or a torch Tensor, got {type(weight).__name__}; "
                        f"wrap it with np.asarray(...) or torch.as_tensor(...)")
    if isinstance(weight, np.ndarray) and not weight.dtype.isnative:
        weight = weight.astype(weight.dtype.newbyteorder("="))
    dtype = str(weight.dtype).replace("torch.", "")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a float dtype ({', '.join(_FLOAT_DTYPES)}), got {dtype}; "
                        f"convert it first, e.g. {name}.astype('float32') or {name}.float()")
    if weight.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (out, in[, *kernel]), got shape "
                         f"{tuple(weight.shape)}; 1-D tensors such as biases have no N:M layout")
    if weight.size == 0 if isinstance(weight, np.ndarray) else weight.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(weight.shape)}); there is nothing to mask")
    if not (is_torch(weight) and weight.device.type == "meta") and not _all_finite(weight):
        finite = np.isfinite(weight) if isinstance(weight, np.ndarray) else weight.detach().isfinite()
        bad = int((~finite).sum())
        raise ValueError(f"{name} holds {bad} NaN or Inf value(s); replace them first "
                         f"(np.nan_to_num / torch.nan_to_num) or fix the weights")
    return weight


def _check_scores(scores, weight):
    """``scores`` validated, in ``weight``'s container and device: what the mask is solved on."""
    if is_torch(weight) and not is_torch(scores):
        import torch

        scores = torch.as_tensor(np.asarray(scores), device=weight.device)
    elif not is_torch(weight) and is_torch(scores):
        scores = scores.detach().cpu().numpy()
    scores = _check_weight(scores, name="scores")
    if tuple(scores.shape) != tuple(weight.shape):
        raise ValueError(f"scores must have the weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    lowest = float(scores.min())
    if lowest < 0:
        raise ValueError(f"scores must be non-negative (the mask keeps the largest total score), got a minimum "
                         f"of {lowest:g}; pass their absolute values, or shift them")
    return scores


def _all_finite(weight):
    """No NaN or Inf in ``weight``: a sum is finite only if every term is, and one
    reduction is far cheaper than a full-size boolean temporary. A finite weight whose
    sum overflows falls back to the element-wise check."""
    if isinstance(weight, np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            total = weight.sum()
        return bool(np.isfinite(total)) or bool(np.isfinite(weight).all())
    data = weight.detach()
    return bool(data.sum().isfinite()) or bool(data.isfinite().all())


def _host_dtype(tensor):
    import torch

    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _as_numpy_bool(x):
    if is_torch(x):
        return (x.detach() != 0).cpu().numpy()
    return np.asarray(x) != 0


def _relative_magnitude(x):
    """``|x| / max|x|`` in float64 (ratios of sums are unchanged, and the sums cannot
    overflow even for weights near float64's largest value)."""
    if is_torch(x):
        x = x.detach().to("cpu", dtype=_host_dtype(x)).numpy()
    magnitude = np.abs(np.asarray(x, dtype=np.float64))
    peak = magnitude.max(initial=0.0)
    return magnitude / peak if peak else magnitude
