"""Training N:M-sparse networks from scratch: sparse layers, STE / SR-STE gradients, mask
refresh, SAD, and sparse GEMMs on GPUs.

``sparsify`` turns a model's ``nn.Linear`` and ``nn.Conv{1,2,3}d`` layers into sparse ones
in place: same parameter names and objects (so optimizers, schedulers, checkpoints and
``torch.compile`` keep working), the dense weight still the trained parameter, and the mask
a ``mask`` buffer saved in the ``state_dict``. The layer computes with ``W * S``; the
gradient passes straight through to ``W`` (STE), plus ``srste_decay * (1 - S) * W`` with
SR-STE (Zhou et al., 2021: pruned weights decay, so the mask settles).

Axis convention: weights ``(out, in[, *kernel])``, groups of M along ``in``; transposable
tiles cover ``(out, in)``, so that both ``Y = X W^T`` and ``dX = dY W`` are N:M.
"""
import fnmatch
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .layout import tiling_error
from .masks import mask, resolve_method
from .patterns import parse_pattern
from .prune import is_conv1d, linear_weight

log = logging.getLogger("transposable")

#: SR-STE's decay on pruned weights, lambda_W in Zhou et al. (2021).
SRSTE_DECAY = 2e-4


class _SparseLinearGEMMs(torch.autograd.Function):
    """``Y = X (W*S)^T + b`` with the three GEMMs of a linear layer written out:
    forward ``X (W*S)^T``, input gradient ``dY (W*S)`` (both sparse when ``kernels`` is
    given), weight gradient ``dY^T X`` (dense, straight through) plus the SR-STE decay."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, decay, kernels):
        # W*S is formed only where a dense GEMM needs it (here and in backward), not kept:
        # saving it would hold a second weight-sized tensor per layer until backward.
        ctx.save_for_backward(x, weight, mask)
        ctx.decay, ctx.kernels, ctx.has_bias = decay, kernels, bias is not None
        flat = x.reshape(-1, x.shape[-1])
        out = kernels.forward(flat) if kernels is not None else flat @ (weight * mask).t()
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, weight.shape[0])
        flat_x = x.reshape(-1, x.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            product = ctx.kernels.input_grad(flat_grad) if ctx.kernels is not None else flat_grad @ (weight * mask)
            grad_x = product.reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = flat_grad.t() @ flat_x
            if ctx.decay:
                grad_weight = grad_weight + ctx.decay * weight * ~mask
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = flat_grad.sum(dim=0)
        return grad_x, grad_weight, None, grad_bias, None, None


class _MaskedWeight(torch.autograd.Function):
    """``W * S`` forward; the gradient reaches all of ``W`` (STE), plus the SR-STE decay.
    Convolutions use it and let ``F.conv*d`` do their GEMMs."""

    @staticmethod
    def forward(ctx, weight, mask, decay):
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        if ctx.decay:
            grad = grad + ctx.decay * weight * ~mask
        return grad, None, None


class SemiStructuredGEMMs:
    """The forward and input-gradient GEMMs of one linear layer on sparse tensor cores.

    ``W*S`` and ``(W*S)^T`` are compressed with ``torch.sparse.to_sparse_semi_structured``
    and recompressed whenever the weight or the mask changes. Needs a CUDA GPU (Ampere or
    newer); :class:`SparseLinear` uses it where :func:`semi_structured_reason` allows.

    Examples
    --------
    >>> import torch
    >>> if torch.cuda.is_available():  # doctest: +SKIP
    ...     layer = sparsify(torch.nn.Linear(128, 128).cuda().half(), "2:4")
    ...     kernels = SemiStructuredGEMMs().update(layer.weight, layer.mask)
    ...     y = kernels.forward(torch.randn(64, 128, device="cuda", dtype=torch.half))
    """

    def __init__(self):
        self._key = None

    def update(self, weight, mask):
        key = (weight.data_ptr(), weight._version, mask._version)
        if key != self._key:
            from torch.sparse import to_sparse_semi_structured

            masked = (weight.detach() * mask).contiguous()
            self._w = to_sparse_semi_structured(masked)
            self._w_t = to_sparse_semi_structured(masked.t().contiguous())
            self._key = key
        return self

    def forward(self, x):
        return F.linear(x, self._w)  # X (W*S)^T

    def input_grad(self, grad):
        return F.linear(grad, self._w_t)  # dY ((W*S)^T)^T = dY (W*S)


def semi_structured_reason(weight, pattern, transposable, training=True):
    """Why a linear layer cannot use sparse tensor cores, or None if it can.

    Training needs W and W^T both 2:4 (transposable); inference only W.

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        The layer's weight (its device, dtype and shape matter).
    pattern : Pattern
        The layer's N:M pattern.
    transposable : bool
        Whether its mask is transposable.
    training : bool, default True
        Ask for forward and backward (True) or forward only.

    Returns
    -------
    str or None
        The reason, e.g. ``"not on a CUDA device"``, or None.

    Examples
    --------
    >>> import torch
    >>> from transposable.patterns import parse_pattern
    >>> semi_structured_reason(torch.zeros(64, 64), parse_pattern("2:4"), True)
    'not on a CUDA device'
    """
    if not weight.is_cuda:
        return "not on a CUDA device"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {str(weight.dtype).replace('torch.', '')} (sparse kernels need float16 or bfloat16)"
    if (pattern.n, pattern.m) != (2, 4) or (training and not transposable):
        need = "transposable 2:4" if training else "2:4"
        return f"pattern {pattern}{'' if transposable else ' row-wise'} (sparse kernels need {need})"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "GPU older than Ampere (compute capability 8.0)"
    from torch.sparse.semi_structured import SparseSemiStructuredTensorCUTLASS

    limits = SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
    rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
    out, inp = weight.shape
    checks = ((out, rows), (inp, cols), (inp, rows), (out, cols)) if training else ((out, rows), (inp, cols))
    if any(size % step or size < step for size, step in checks):
        return f"shape {tuple(weight.shape)}: {'W and W^T' if training else 'W'} must be multiples of ({rows}, {cols})"
    return None


class _SparseLayer:
    """What every sparse layer adds to its dense base class."""

    def _setup_sparse(self, pattern, transposable, method, decay, refresh_every, refresh_method):
        self.pattern = pattern
        self.transposable = transposable
        self.srste_decay = decay
        self.refresh_every = refresh_every
        self.refresh_method = refresh_method
        self._kernels, self._dense_reason = None, None
        self.register_buffer("mask", self.solve_mask(method), persistent=True)

    def solve_mask(self, method):
        """The best mask of the current weight, on its device, in the weight's stored layout
        (solved on its ``(out, in)`` view: groups along the input features)."""
        with torch.no_grad():
            solved = mask(linear_weight(self).detach(), self.pattern, transposable=self.transposable, method=method)
            return solved.t() if is_conv1d(self) else solved

    def extra_repr(self):
        kind = "transposable" if self.transposable else "row-wise"
        return f"{super().extra_repr()}, sparsity={self.pattern} {kind}, srste_decay={self.srste_decay}"


class SparseLinear(_SparseLayer, nn.Linear):
    """``nn.Linear`` computing with ``W * mask`` (see :func:`sparsify`).

    Made by :func:`sparsify`, which swaps the class of an existing layer (same parameters,
    plus a ``mask`` buffer).

    Examples
    --------
    >>> import torch
    >>> layer = sparsify(torch.nn.Linear(8, 16), "2:4")
    >>> type(layer).__name__, isinstance(layer, torch.nn.Linear), tuple(layer.mask.shape)
    ('SparseLinear', True, (16, 8))
    """

    def forward(self, x):
        decay = self.srste_decay if self.training else 0.0
        return _SparseLinearGEMMs.apply(x, self.weight, self.mask, self.bias, decay, self._sparse_kernels())

    def _sparse_kernels(self):
        reason = semi_structured_reason(self.weight, self.pattern, self.transposable)
        if reason is not None:
            if reason != self._dense_reason:
                log.info("%s: dense masked GEMMs: %s", self._sparse_name(), reason)
                self._dense_reason = reason
            return None
        if self._kernels is None:
            self._kernels = SemiStructuredGEMMs()
        return self._kernels.update(self.weight, self.mask)

    def _sparse_name(self):
        return f"SparseLinear({self.in_features}, {self.out_features})"


class _SparseConv(_SparseLayer):
    def forward(self, x):
        decay = self.srste_decay if self.training else 0.0
        return self._conv_forward(x, _MaskedWeight.apply(self.weight, self.mask, decay), self.bias)


class SparseConv1d(_SparseConv, nn.Conv1d):
    """``nn.Conv1d`` computing with ``W * mask``.

    Made by :func:`sparsify`, which swaps the class of an existing layer (same parameters,
    plus a ``mask`` buffer).

    Examples
    --------
    >>> import torch
    >>> layer = sparsify(torch.nn.Conv1d(8, 16, 3), "2:4")
    >>> type(layer).__name__, isinstance(layer, torch.nn.Conv1d), tuple(layer.mask.shape)
    ('SparseConv1d', True, (16, 8, 3))
    """


class SparseConv2d(_SparseConv, nn.Conv2d):
    """``nn.Conv2d`` computing with ``W * mask``.

    Made by :func:`sparsify`, which swaps the class of an existing layer (same parameters,
    plus a ``mask`` buffer).

    Examples
    --------
    >>> import torch
    >>> layer = sparsify(torch.nn.Conv2d(8, 16, 3), "2:4")
    >>> type(layer).__name__, isinstance(layer, torch.nn.Conv2d), tuple(layer.mask.shape)
    ('SparseConv2d', True, (16, 8, 3, 3))
    """


class SparseConv3d(_SparseConv, nn.Conv3d):
    """``nn.Conv3d`` computing with ``W * mask``.

    Made by :func:`sparsify`, which swaps the class of an existing layer (same parameters,
    plus a ``mask`` buffer).

    Examples
    --------
    >>> import torch
    >>> layer = sparsify(torch.nn.Conv3d(8, 16, 1), "2:4")
    >>> type(layer).__name__, isinstance(layer, torch.nn.Conv3d), tuple(layer.mask.shape)
    ('SparseConv3d', True, (16, 8, 1, 1, 1))
    """


class _SparseConv1D(_SparseLayer):
    """What a GPT-2 style ``Conv1D`` (weight stored ``(in, out)``) gets: the linear layer's
    three GEMMs, written out on the ``(out, in)`` view of ``W * mask``."""

    def forward(self, x):
        decay = self.srste_decay if self.training else 0.0
        return _SparseLinearGEMMs.apply(x, self.weight.t(), self.mask.t(), self.bias, decay, None)


SPARSE_CLASSES = {nn.Linear: SparseLinear, nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d,
                  nn.Conv3d: SparseConv3d}
DENSE_CLASSES = {sparse: dense for dense, sparse in SPARSE_CLASSES.items()}


def _sparse_class(module):
    """The sparse class for a layer, or None. ``Conv1D`` lives in transformers, so its sparse
    class is made on first sight (importable as ``transposable.nn.SparseConv1D``)."""
    base = type(module)
    if base not in SPARSE_CLASSES and is_conv1d(module):
        sparse = type("SparseConv1D", (_SparseConv1D, base), {
            "__module__": __name__,
            "__doc__": "GPT-2 style ``Conv1D`` computing with ``W * mask`` (see :func:`sparsify`)."})
        globals()["SparseConv1D"] = sparse
        SPARSE_CLASSES[base], DENSE_CLASSES[sparse] = sparse, base
    return SPARSE_CLASSES.get(base)


def sparsify(model, pattern, *, transposable=True, gradient="srste", srste_decay=SRSTE_DECAY, method="auto",
             refresh_every=None, refresh_method="greedy", include=None, exclude=(), skip_first=False,
             skip_last=False):
    """Make a model's linear and conv layers N:M sparse, in place.

    ``nn.Linear``, ``nn.Conv{1,2,3}d`` and GPT-2 style ``Conv1D`` layers (weight stored
    ``(in, out)``: masks are solved on the ``(out, in)`` view, groups along the input
    features, and kept in the stored layout).

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned.
    pattern : str or tuple
        ``"2:4"``, ``"4:8"``, ... (N kept of every M along each weight's input dimension).
    transposable : bool, default True
        Transposable masks (the weight's transpose is N:M too, for the backward GEMM).
    gradient : {"srste", "ste"}
        Straight-through gradients, with (SR-STE) or without (STE) the decay of pruned weights.
    srste_decay : float or dict, default 2e-4
        SR-STE's lambda_W; a dict maps layer names to their own value (others: 2e-4).
    method : str, default "auto"
        Solver of the initial masks (exact by default).
    refresh_every : int, optional
        Optimizer steps between mask refreshes (see :class:`MaskRefresher`); default 40 for
        transposable masks (Hubara et al.), 1 for row-wise ones (Zhou et al.).
    refresh_method : str, default "greedy"
        Solver used at refreshes (transposable masks).
    include, exclude : sequence of str, optional
        Glob patterns on layer names (``model.named_modules()``).
    skip_first, skip_last : bool
        Leave the first / last prunable layer dense.

    Returns
    -------
    nn.Module
        ``model``; its sparse layers are :class:`SparseLinear`, :class:`SparseConv2d`, ...
        (subclasses of the originals) with a ``mask`` buffer. Layers whose shape does not
        tile stay dense and are logged.

    Raises
    ------
    ValueError
        For a bad pattern, method or gradient, or if no layer is left to sparsify.

    Examples
    --------
    >>> import torch
    >>> model = sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), "2:4")
    >>> [name for name, _ in model.named_parameters()], int(model[0].mask.sum())
    (['0.weight', '0.bias'], 32)
    """
    pattern = parse_pattern(pattern)
    if gradient not in ("srste", "ste"):
        raise ValueError(f"gradient must be 'srste' or 'ste', got {gradient!r}")
    resolve_method(method, pattern, transposable=transposable)
    resolve_method(refresh_method, pattern)
    candidates = [(name, module) for name, module in model.named_modules() if _sparse_class(module) is not None]
    if skip_first:
        candidates = candidates[1:]
    if skip_last:
        candidates = candidates[:-1]
    chosen = []
    for name, module in candidates:
        if include is not None and not any(fnmatch.fnmatchcase(name, g) for g in include):
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in exclude):
            continue
        error = tiling_error(tuple(linear_weight(module).shape), pattern.m, transposable=transposable)
        if error is not None:
            log.warning("%s: weight %s does not tile at %s (%s); left dense", name, tuple(module.weight.shape),
                        pattern, error.reason)
            continue
        chosen.append((name, module))
    if not chosen:
        raise ValueError(f"no layer to sparsify at {pattern} (check include/exclude and the layer shapes)")
    every = refresh_every if refresh_every is not None else (40 if transposable else 1)
    for name, module in chosen:
        decay = 0.0 if gradient == "ste" else (
            srste_decay.get(name, SRSTE_DECAY) if isinstance(srste_decay, dict) else srste_decay)
        module.__class__ = _sparse_class(module)
        module._setup_sparse(pattern, transposable, method, decay, every, refresh_method)
    return model


def sparse_layers(model):
    """Every sparse layer of a model, with its name.

    Parameters
    ----------
    model : nn.Module
        A model passed through :func:`sparsify`.

    Returns
    -------
    list of (str, nn.Module)
        ``(name, layer)`` in ``model.named_modules()`` order.

    Examples
    --------
    >>> import torch
    >>> model = sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 6)), "2:4")
    >>> [name for name, _ in sparse_layers(model)]  # 6 outputs do not tile at 2:4
    ['0']
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _SparseLayer)]


class MaskRefresher:
    """Re-solves the masks of a sparsified model every few optimizer steps and records SAD.

    SAD (Zhou et al., 2021) is how many mask entries flip between two refreshes,
    ``||S_new - S_old||_1``, per layer and in total.

    Parameters
    ----------
    model : nn.Module
        A model passed through :func:`sparsify` (or a DistributedDataParallel wrapper of one).

    Examples
    --------
    >>> import torch
    >>> model = sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), "2:4", refresh_every=1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    >>> refresher = MaskRefresher(model).attach(optimizer)
    >>> model(torch.randn(4, 8)).sum().backward(); optimizer.step()
    >>> refresher.history[-1]["step"]
    1
    """

    def __init__(self, model):
        self.model = getattr(model, "module", model)
        self.layers = sparse_layers(self.model)
        if not self.layers:
            raise ValueError("the model has no sparse layers; call sparsify(model, ...) first")
        self.steps = 0
        self.history = []

    def attach(self, optimizer):
        """Call :meth:`step` after every ``optimizer.step()``. Returns ``self``."""
        optimizer.register_step_post_hook(lambda *args: self.step())
        return self

    def step(self):
        """Count one optimizer step; refresh the masks that are due."""
        self.steps += 1
        due = [(name, layer) for name, layer in self.layers if self.steps % layer.refresh_every == 0]
        if due:
            self.refresh(due)

    def refresh(self, layers=None):
        """Re-solve the masks of ``layers`` (default: all) now; returns the SAD record."""
        record = {"step": self.steps, "layers": {}}
        with torch.no_grad():
            for name, layer in layers if layers is not None else self.layers:
                old = layer.mask.clone()
                layer.mask.copy_(layer.solve_mask(layer.refresh_method if layer.transposable else "auto"))
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # Every rank keeps rank 0's masks. Broadcast into the buffer the layer keeps
                    # alive, not into a temporary: gloo may release a finished work item after
                    # Python is done with its tensors, and then must not own their last reference.
                    torch.distributed.broadcast(layer.mask, src=0)
                flips = int((old != layer.mask).sum())
                record["layers"][name] = {"flips": flips, "fraction": flips / layer.mask.numel()}
        flips = sum(v["flips"] for v in record["layers"].values())
        size = sum(layer.mask.numel() for name, layer in self.layers if name in record["layers"])
        record["total"] = {"flips": flips, "fraction": flips / size}
        self.history.append(record)
        return record

    def table(self):
        """The SAD history as a text table: one row per refresh, one column per layer."""
        names = [name for name, _ in self.layers]
        lines = ["| step | " + " | ".join(names) + " | total flips | total fraction |",
                 "|---" * (len(names) + 3) + "|"]
        for record in self.history:
            cells = [str(record["layers"][n]["flips"]) if n in record["layers"] else "-" for n in names]
            lines.append(f"| {record['step']} | " + " | ".join(cells) +
                         f" | {record['total']['flips']} | {record['total']['fraction']:.5f} |")
        return "\n".join(lines)

    def state_dict(self):
        return {"steps": self.steps, "history": list(self.history)}

    def load_state_dict(self, state):
        self.steps, self.history = state["steps"], list(state["history"])


def end_distributed():
    """Tear the default process group down while the interpreter can still run its threads.

    Call it at the end of a distributed script, after dropping (``del``) the
    ``DistributedDataParallel`` or FSDP wrappers, which hold the process group. It waits for
    every rank (``barrier``), collects reference cycles that may still hold the group, and
    destroys the group, which joins gloo's worker threads.

    Skipping it can abort a finished job at exit ("terminate called without an active
    exception", exit code -6): a gloo thread still releasing a finished collective's
    Python-owned tensors needs the GIL, which an interpreter that is already finalizing no
    longer grants. Does nothing when no process group is initialized.

    Examples
    --------
    >>> end_distributed()  # no process group here: nothing to do

    In a script run by ``torchrun``::

        ddp = DistributedDataParallel(sparsify(model, "2:4"))
        ...                     # train, refresh masks, save
        del ddp, optimizer      # they hold the process group
        end_distributed()
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def export(model, *, compress=False):
    """Fold every mask into its weight and hand back plain layers, in place.

    Sparse layers become ``nn.Linear`` / ``nn.Conv*d`` again, their weights ``W * mask``.

    Parameters
    ----------
    model : nn.Module
        A model passed through :func:`sparsify`; changed in place.
    compress : bool, default False
        Also store eligible linear weights (CUDA, float16/bfloat16, 2:4) compressed as
        semi-structured sparse tensors for inference (frozen: ``requires_grad=False``).

    Returns
    -------
    nn.Module
        ``model``, whose ``state_dict`` loads into the original architecture.

    Examples
    --------
    >>> import torch
    >>> model = export(sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), "2:4"))
    >>> type(model[0]).__name__, int((model[0].weight != 0).sum())
    ('Linear', 32)
    """
    for name, layer in sparse_layers(model):
        with torch.no_grad():
            layer.weight.mul_(layer.mask)
        del layer._buffers["mask"]
        pattern, transposable = layer.pattern, layer.transposable
        for attribute in ("pattern", "transposable", "srste_decay", "refresh_every", "refresh_method",
                          "_kernels", "_dense_reason"):
            delattr(layer, attribute)
        layer.__class__ = DENSE_CLASSES[type(layer)]
        if compress and isinstance(layer, nn.Linear):
            reason = semi_structured_reason(layer.weight, pattern, transposable, training=False)
            if reason is None:
                from torch.sparse import to_sparse_semi_structured

                layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
            else:
                log.info("%s: kept dense: %s", name, reason)
    return model
