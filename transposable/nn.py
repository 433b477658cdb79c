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
import glob
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import solvers

from .layers import is_conv1d, linear_weight, prunable
from .layout import Layout, tiling_error
from .masks import check_flag, mask, resolve_method
from .patterns import parse_pattern

log = logging.getLogger("transposable")

#: SR-STE's decay on pruned weights, lambda_W in Zhou et al. (2021).
SRSTE_DECAY = 2e-4

#: Why sparse layers ran dense masked GEMMs, each said once at INFO in this process.
_REASONS_LOGGED = set()


def _masked(weight, mask):
    """``W * S``. The bool mask is read as bytes: a float times bool promotes the mask to a
    temporary float copy first, which costs 3-5x the product itself."""
    return weight * mask.view(torch.uint8)


def _autocast_dtype(device_type):
    """The dtype autocast runs linear layers in on this device type, or None where it is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def _compute_dtype(x, weight):
    """The dtype a sparse linear layer's GEMMs run in: autocast's, where autocast is on for
    the input's device (as ``nn.Linear``: float64 stays float64), else the weight's.

    Parameters
    ----------
    x : Tensor
        The layer's input.
    weight : Tensor
        The layer's weight.

    Returns
    -------
    torch.dtype

    Examples
    --------
    >>> import torch
    >>> x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     inside = _compute_dtype(x, w)
    >>> inside, _compute_dtype(x, w)
    (torch.bfloat16, torch.float32)
    """
    autocast = _autocast_dtype(x.device.type)
    return autocast if autocast is not None and weight.dtype != torch.float64 else weight.dtype


class _SparseLinearGEMMs(torch.autograd.Function):
    """``Y = X (W*S)^T + b`` for a 2-D ``X``, with the three GEMMs of a linear layer written
    out: forward ``X (W*S)^T``, input gradient ``dY (W*S)`` (both sparse when ``kernels`` is
    given), weight gradient ``dY^T X`` (dense, straight through) plus the SR-STE decay.

    All three run in ``dtype`` (see :func:`_compute_dtype`), the gradients handed back in the
    dtypes of ``X`` and ``W``: under autocast an fp32 master weight trains exactly as
    ``nn.Linear`` does there, and backward, which runs outside the autocast region, never
    mixes dtypes. With a ``backward_pattern`` the input gradient is ``dY (W*S*B)`` (see
    :func:`_input_grad_weight`)."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, decay, kernels, dtype, backward_pattern):
        x_in = x.to(dtype)
        # W*S is formed only where a dense GEMM needs it (here and in backward), not kept:
        # saving it would hold a second weight-sized tensor per layer until backward.
        ctx.save_for_backward(x_in, weight, mask)
        ctx.decay, ctx.kernels, ctx.dtype, ctx.x_dtype = decay, kernels, dtype, x.dtype
        ctx.backward_pattern = backward_pattern
        ctx.bias_dtype = None if bias is None else bias.dtype
        bias = None if bias is None else bias.to(dtype)
        if kernels is not None:
            out = kernels.forward(x_in)
            return out if bias is None else out.add_(bias)
        masked = _masked(weight.to(dtype), mask).t()
        return x_in @ masked if bias is None else torch.addmm(bias, x_in, masked)

    @staticmethod
    def backward(ctx, grad_out):
        x_in, weight, mask = ctx.saved_tensors
        grad_out = grad_out.to(ctx.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.kernels is None:
                masked = _masked(weight.to(ctx.dtype), mask)
                if ctx.backward_pattern is not None:
                    masked = _input_grad_weight(masked, ctx.backward_pattern)
                grad_x = grad_out @ masked
            else:
                grad_x = ctx.kernels.input_grad(grad_out)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out.t() @ x_in).to(weight.dtype)
            if ctx.decay:  # lambda * (1 - S) * W: exactly W on pruned entries, 0 on kept ones
                grad_weight.addcmul_(weight, (~mask).view(torch.uint8), value=ctx.decay)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_weight, None, grad_bias, None, None, None, None


def _sparse_linear(x, weight, mask, bias, decay, kernels, dtype, backward_pattern=None):
    """The sparse GEMMs on inputs of any shape ``(..., in)``. The Function sees 2-D tensors
    and the reshapes happen outside it: an output that is a view made inside a custom
    Function cannot be changed in place (``ReLU(inplace=True)``, ``x += ...``)."""
    args = (weight, mask, bias, decay, kernels, dtype, backward_pattern)
    if x.dim() == 2:
        return _SparseLinearGEMMs.apply(x, *args)
    out = _SparseLinearGEMMs.apply(x.reshape(-1, x.shape[-1]), *args)
    return out.view(*x.shape[:-1], weight.shape[0])


def _input_grad_weight(masked, pattern):
    """``W*S*B``, the weight of the input gradient under a backward mask (Bi-Mask, Zhang et
    al. 2023): ``B`` keeps the ``n`` largest ``|W*S|`` of every ``m`` along the output
    features, so that ``(W*S*B)^T`` is N:M and ``dY (W*S*B)`` runs on sparse tensor cores
    like the forward GEMM. It approximates ``dY (W*S)``: the kept weights that a group of
    ``m`` outputs holds beyond ``n`` are left out of the input gradient only."""
    out, inp = masked.shape
    # compiled code must stay in torch operations; eager CPU code takes the compiled kernel (6x faster)
    solve = solvers.rowwise.solve_in_torch if torch.compiler.is_compiling() else solvers.rowwise.solve
    keep = solve(masked.t().reshape(-1, pattern.m), pattern.n)
    return masked * keep.reshape(inp, out).t()


class _MaskedWeight(torch.autograd.Function):
    """``W * S`` forward; the gradient reaches all of ``W`` (STE), plus the SR-STE decay.
    Convolutions use it and let ``F.conv*d`` do their GEMMs (autocast included)."""

    @staticmethod
    def forward(ctx, weight, mask, decay):
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return _masked(weight, mask)

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        if ctx.decay:
            grad = grad + ctx.decay * (weight - _masked(weight, mask))
        return grad, None, None


def _semi_structured_class(device):
    """The torch class that compresses and multiplies 2:4 weights on this GPU, and None with
    the reason where none can.

    ``to_sparse_semi_structured`` takes cuSPARSELt unless ``_FORCE_CUTLASS`` is set, and
    fails at the first GEMM where the build has no cuSPARSELt; CUTLASS's 2:4 kernels run on
    compute capability 8.x only. So the class is chosen here, once per layer and step.
    """
    from torch.sparse.semi_structured import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                                              SparseSemiStructuredTensorCUTLASS)

    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    if not forced and torch.backends.cusparselt.is_available():
        return SparseSemiStructuredTensorCUSPARSELT, None
    why = "SparseSemiStructuredTensor._FORCE_CUTLASS is set" if forced else "this PyTorch build has no cuSPARSELt"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 8:
        return None, f"{why} and CUTLASS's 2:4 kernels run on compute capability 8.x only (this GPU: {major}.{minor})"
    if why not in _REASONS_LOGGED:
        _REASONS_LOGGED.add(why)
        log.info("%s: 2:4 GEMMs run on CUTLASS", why)
    return SparseSemiStructuredTensorCUTLASS, None


def _compress(dense, semi_structured):
    """``dense`` (2-D, contiguous) as a ``semi_structured`` tensor whose products come out
    row-major: cuSPARSELt writes ``X W^T`` transposed (column-major) unless asked to fuse the
    transpose, and scaled_dot_product_attention refuses its fused kernels for q, k, v whose
    last dimension is strided (it would fall back to math attention in the sparse model only)."""
    sparse = semi_structured.from_dense(dense)
    if semi_structured.BACKEND == "cusparselt":
        sparse.fuse_transpose_cusparselt = True
    return sparse


def _dense_operand(x):
    """``x`` as cuSPARSELt can read it: it takes a dense operand for row-major when it is
    contiguous and for the transpose of a row-major matrix otherwise, so anything else (a
    column slice, the expanded gradient of ``y.sum()``) is copied first."""
    return x if x.is_contiguous() or x.t().is_contiguous() else x.contiguous()


def _row_major(out):
    """The product row-major (CUTLASS writes it column-major; a copy, where it did)."""
    return out if out.is_contiguous() else out.contiguous()


class SemiStructuredGEMMs:
    """The forward and input-gradient GEMMs of one linear layer on sparse tensor cores.

    ``W*S`` and ``(W*S)^T``, in the dtype the GEMMs run in, are compressed as PyTorch's
    semi-structured sparse tensors (cuSPARSELt; CUTLASS on compute capability 8.x where the
    build has no cuSPARSELt or ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set) and
    recompressed whenever the weight, the mask or the dtype changes. Products come out
    row-major, whatever the strides of the dense operand. The compressed copies are a cache:
    ``copy.deepcopy``, ``pickle`` and ``torch.save`` leave them out (the copy compresses its
    own at its first GEMM). Needs a CUDA GPU (Ampere or newer); :class:`SparseLinear` uses it
    where :func:`semi_structured_reason` allows.

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

    def update(self, weight, mask, dtype=None, backward_pattern=None):
        """Compress ``W * mask`` (and its transpose) in ``dtype`` unless that is done already.

        Parameters
        ----------
        weight : Tensor, shape (out, in)
            The layer's weight, on a CUDA device.
        mask : Tensor of bool, shape (out, in)
            Its 2:4 mask: transposable, or row-wise with ``backward_pattern``.
        dtype : torch.dtype, optional
            float16 or bfloat16, the dtype of the GEMMs; default the weight's.
        backward_pattern : Pattern, optional
            For a row-wise mask: the input gradient's weight is ``W*S*B``, ``B`` the 2:4
            mask of ``|W*S|`` along the output features (a backward mask, see
            :func:`sparsify`), compressed instead of ``(W*S)^T``.

        Returns
        -------
        SemiStructuredGEMMs
            ``self``.

        Raises
        ------
        RuntimeError
            If no semi-structured backend runs on the weight's GPU (the message says why).
        """
        dtype = weight.dtype if dtype is None else dtype
        key = (weight.data_ptr(), weight._version, mask._version, dtype, backward_pattern)
        if key != self._key:
            semi_structured, reason = _semi_structured_class(weight.device)
            if semi_structured is None:
                raise RuntimeError(f"no sparse GEMMs on {weight.device}: {reason}")
            masked = _masked(weight.detach().to(dtype), mask)
            self._w = _compress(masked, semi_structured)
            backward = masked if backward_pattern is None else _input_grad_weight(masked, backward_pattern)
            self._w_t = _compress(backward.t().contiguous(), semi_structured)
            self._key = key
        return self

    def forward(self, x):
        """``X (W*S)^T`` for a 2-D ``x`` (tokens, in) in the compressed dtype."""
        return _row_major(F.linear(_dense_operand(x), self._w))

    def input_grad(self, grad):
        """``dY (W*S)`` for a 2-D ``grad`` (tokens, out) in the compressed dtype."""
        return _row_major(F.linear(_dense_operand(grad), self._w_t))  # dY ((W*S)^T)^T

    def __getstate__(self):
        # PyTorch's semi-structured tensors cannot be cloned (deepcopy) or pickled in every
        # release; the copy compresses its own weight at its first GEMM.
        return {}

    def __setstate__(self, state):
        self.__init__()


def semi_structured_reason(weight, pattern, transposable, training=True, dtype=None, backward_mask=False):
    """Why a linear layer cannot use sparse tensor cores, or None if it can.

    Training needs W and W^T both 2:4 (transposable, or row-wise with a backward mask);
    inference only W.

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
    dtype : torch.dtype, optional
        The dtype the GEMMs run in: under autocast, autocast's (float32 weights then run
        on sparse tensor cores in float16/bfloat16); default the weight's.
    backward_mask : bool, default False
        Whether a row-wise layer has a backward mask (see :func:`sparsify`).

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
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return (f"dtype {str(dtype).replace('torch.', '')} (sparse kernels need float16 or bfloat16: "
                "the weight's, or autocast's)")
    if (pattern.n, pattern.m) != (2, 4) or (training and not (transposable or backward_mask)):
        need = "transposable 2:4, or row-wise 2:4 with backward_mask=True" if training else "2:4"
        return f"pattern {pattern}{'' if transposable else ' row-wise'} (sparse kernels need {need})"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "GPU older than Ampere (compute capability 8.0)"
    semi_structured, reason = _semi_structured_class(weight.device)
    if semi_structured is None:
        return reason
    limits = semi_structured._DTYPE_SHAPE_CONSTRAINTS[dtype]
    rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
    out, inp = weight.shape
    checks = ((out, rows), (inp, cols), (inp, rows), (out, cols)) if training else ((out, rows), (inp, cols))
    if any(size % step or size < step for size, step in checks):
        return (f"shape {tuple(weight.shape)}: {'W and W^T' if training else 'W'} must be multiples of "
                f"({rows}, {cols}) for {semi_structured.BACKEND}")
    return None


class _SparseLayer:
    """What every sparse layer adds to its dense base class."""

    def _setup_sparse(self, pattern, transposable, method, decay, refresh_every, refresh_method, backward_mask):
        self.pattern = pattern
        self.transposable = transposable
        self.backward_mask = backward_mask
        self.srste_decay = decay
        self.refresh_every = refresh_every
        self.refresh_method = refresh_method
        self._kernels, self._dense_reason = None, None
        self.register_buffer("mask", self.solve_mask(method), persistent=True)

    def solve_mask(self, method, weight=None):
        """The best mask of the current weight, on its device, in the weight's stored layout.

        Solved on the ``(out, in)`` view (groups along the input features). A weight sharded
        by FSDP2 is gathered whole first (a collective: every rank calls this together), so
        tiles never straddle shards.

        Parameters
        ----------
        method : str
            The solver, as in :func:`transposable.mask`.
        weight : Tensor, optional
            The whole ``(out, in)`` weight, when the caller has already gathered it.

        Returns
        -------
        Tensor of bool
            The mask, shaped as the stored weight.
        """
        with torch.no_grad():
            weight = self._whole_weight() if weight is None else weight
            solved = mask(weight, self.pattern, transposable=self.transposable, method=method)
            return solved.t() if is_conv1d(self) else solved

    def _whole_weight(self):
        """The ``(out, in)`` view of the weight, a sharded (DTensor) one gathered on every rank."""
        weight = self.weight.detach()
        if hasattr(weight, "full_tensor"):
            weight = weight.full_tensor()
        return weight.t() if is_conv1d(self) else weight

    def better_mask(self, candidate, weight=None):
        """Per tile (row-wise: per group), whichever of the current mask and ``candidate``
        keeps more ``|W|`` of the current weight; ties keep the current one.

        A refresh with the greedy could otherwise lose to the exact initial mask, and flip
        entries of weights that did not change: SAD would measure the solver, not training.

        Parameters
        ----------
        candidate : Tensor of bool
            A newly solved mask, shaped as the stored weight.
        weight : Tensor, optional
            The whole ``(out, in)`` weight, when the caller has already gathered it.

        Returns
        -------
        Tensor of bool
            The better mask per tile, shaped as the stored weight.
        """
        weight = self._whole_weight() if weight is None else weight
        current, candidate = (m.t() if is_conv1d(self) else m for m in (self.mask, candidate))
        layout = Layout(tuple(weight.shape), self.pattern.m, transposable=self.transposable, pad=False)
        magnitude = layout.blocks(weight.abs().to(torch.float64 if weight.dtype == torch.float64 else torch.float32))
        kept_axes = (1, 3) if self.transposable else (1,)
        blocks_now, blocks_new = layout.blocks(current), layout.blocks(candidate)
        gain = (magnitude * blocks_new).sum(dim=kept_axes) > (magnitude * blocks_now).sum(dim=kept_axes)
        gain = gain[:, None, :, None] if self.transposable else gain[:, None]
        better = layout.unblock(torch.where(gain, blocks_new, blocks_now))
        return better.t() if is_conv1d(self) else better

    def extra_repr(self):
        kind = "transposable" if self.transposable else "row-wise"
        backward = ", backward_mask=True" if self.backward_mask else ""
        return f"{super().extra_repr()}, sparsity={self.pattern} {kind}{backward}, srste_decay={self.srste_decay}"

    def _backward_pattern(self):
        """The pattern of the backward mask, or None (the input gradient uses ``W*S``)."""
        return self.pattern if self.backward_mask else None


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
        dtype = _compute_dtype(x, self.weight)
        return _sparse_linear(x, self.weight, self.mask, self.bias, decay, self._sparse_kernels(dtype), dtype,
                              self._backward_pattern())

    def _sparse_kernels(self, dtype=None):
        """The layer's sparse GEMMs for ``dtype`` (default the weight's), or None where the
        dense masked GEMMs run (the reason logged once)."""
        reason = semi_structured_reason(self.weight, self.pattern, self.transposable, dtype=dtype,
                                        backward_mask=self.backward_mask)
        if reason is not None:
            # Logging inside a compiled region would break the graph: compiled code says nothing.
            if reason != self._dense_reason and not torch.compiler.is_compiling():
                # One INFO line per reason and process (not one per layer); each layer at DEBUG.
                level = logging.DEBUG if reason in _REASONS_LOGGED else logging.INFO
                _REASONS_LOGGED.add(reason)
                log.log(level, "%s: dense masked GEMMs: %s%s", self._sparse_name(), reason,
                        "" if level == logging.DEBUG else " (the same for every layer in this state: logged once)")
                self._dense_reason = reason
            return None
        if self._kernels is None:
            self._kernels = SemiStructuredGEMMs()
        return self._kernels.update(self.weight, self.mask, dtype, self._backward_pattern())

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
        return _sparse_linear(x, self.weight.t(), self.mask.t(), self.bias, decay, None,
                              _compute_dtype(x, self.weight), self._backward_pattern())


#: The layer types sparsify knows; their subclasses (same forward) and ``Conv1D`` join on first sight.
BASE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SPARSE_CLASSES = dict(zip(BASE_LAYERS, (SparseLinear, SparseConv1d, SparseConv2d, SparseConv3d)))
DENSE_CLASSES = {sparse: dense for dense, sparse in SPARSE_CLASSES.items()}


def _sparse_class(module):
    """The sparse class for a layer, or None.

    A subclass of ``nn.Linear`` / ``nn.Conv*d`` that keeps its base's ``forward`` gets a
    sparse subclass of its own, made on first sight, so that ``isinstance`` checks hold and
    :func:`export` gives the user's class back. ``Conv1D`` lives in transformers, so its
    sparse class is made the same way (importable as ``transposable.nn.SparseConv1D``).
    """
    base = type(module)
    if base in SPARSE_CLASSES:
        return SPARSE_CLASSES[base]
    if isinstance(module, _SparseLayer):
        return None
    if is_conv1d(module):
        mixin, name = _SparseConv1D, "SparseConv1D"
    else:
        plain = next((layer for layer in BASE_LAYERS if isinstance(module, layer)), None)
        if plain is None or base.forward is not plain.forward:
            return None
        mixin, name = SPARSE_CLASSES[plain], f"Sparse{base.__name__}"
    sparse = type(name, (mixin, base), {
        "__module__": __name__,
        "__doc__": f"``{base.__name__}`` computing with ``W * mask`` (see :func:`sparsify`)."})
    if mixin is _SparseConv1D:
        globals()["SparseConv1D"] = sparse
    SPARSE_CLASSES[base], DENSE_CLASSES[sparse] = sparse, base
    return sparse


def _left_dense_reason(name, module, parent, shared_with, named_by_user):
    """Why ``sparsify`` leaves a prunable-looking layer dense, or None."""
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention uses this weight without calling the layer"
    if _sparse_class(module) is None:
        return f"{type(module).__name__} overrides forward(), so W * mask would not reach its computation"
    if shared_with and not named_by_user:
        return f"weight shared with {', '.join(shared_with)} (tied); name it in include= to sparsify it anyway"
    return None


def sparsify(model, pattern, *, transposable=True, gradient="srste", srste_decay=SRSTE_DECAY, method="auto",
             refresh_every=None, refresh_method="greedy", backward_mask=False, include=None, exclude=(),
             filter_fn=None, skip_first=False, skip_last=False):
    """Make a model's linear and conv layers N:M sparse, in place.

    ``nn.Linear``, ``nn.Conv{1,2,3}d`` and GPT-2 style ``Conv1D`` layers (weight stored
    ``(in, out)``: masks are solved on the ``(out, in)`` view, groups along the input
    features, and kept in the stored layout).

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned.
    pattern : str, tuple or dict
        ``"2:4"``, ``"4:8"``, ... (N kept of every M along each weight's input dimension),
        or a mapping from glob patterns on layer names to patterns, for a pattern per layer
        (``{"*.mlp.*": "2:4", "*.attn.*": "8:16"}``): each layer takes the first glob that
        matches its name; layers no glob matches are left alone.
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
    backward_mask : bool, default False
        Row-wise masks on linear layers only: give the input-gradient GEMM ``dY (W*S)`` a
        second N:M mask ``B``, along the output features, chosen every step from ``|W*S|``
        (Bi-Mask, Zhang et al. 2023), so that on a GPU both GEMMs of row-wise 2:4 layers
        run on sparse tensor cores, as with transposable masks, while the model keeps its
        row-wise masks (which lose less than transposable ones). The input gradient becomes
        ``dY (W*S*B)``, an approximation; the forward pass and the weight gradient are
        unchanged.
    include, exclude : sequence of str, optional
        Glob patterns on layer names (``model.named_modules()``).
    filter_fn : callable, optional
        ``filter_fn(module, fqn) -> bool``: sparsify only the layers it accepts (as
        ``torchao``'s ``sparsify_``), on top of the globs.
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
        For a bad pattern, method or gradient, a backward mask on transposable masks or on
        a convolution, or if no layer is left to sparsify.

    Examples
    --------
    >>> import torch
    >>> model = sparsify(torch.nn.Sequential(torch.nn.Linear(8, 8)), "2:4")
    >>> [name for name, _ in model.named_parameters()], int(model[0].mask.sum())
    (['0.weight', '0.bias'], 32)
    """
    per_layer = dict(pattern) if isinstance(pattern, Mapping) else {"*": pattern}
    if not per_layer:
        raise ValueError("pattern is an empty mapping; give a pattern such as '2:4' or {glob: pattern}")
    per_layer = {rule: parse_pattern(value) for rule, value in per_layer.items()}
    if gradient not in ("srste", "ste"):
        raise ValueError(f"gradient must be 'srste' or 'ste', got {gradient!r}")
    check_flag("backward_mask", backward_mask)
    if backward_mask and transposable:
        raise ValueError("backward_mask=True is for row-wise masks: a transposable mask serves the backward GEMM "
                         "already; pass transposable=False, or leave backward_mask off")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable filter_fn(module, fqn) -> bool, got {filter_fn!r}")
    for value in per_layer.values():
        resolve_method(method, value, transposable=transposable)
        resolve_method(refresh_method, value)
    named = dict(model.named_modules())
    owners = {}  # parameter -> the modules holding it (tied weights are held by several)
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    candidates = [(name, module) for name, module in named.items()
                  if prunable(module) and not isinstance(module, _SparseLayer)]
    if skip_first:
        candidates = candidates[1:]
    if skip_last:
        candidates = candidates[:-1]
    chosen, left_dense = [], []
    for name, module in candidates:
        if include is not None and not any(fnmatch.fnmatchcase(name, g) for g in include):
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in exclude):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        layer_pattern = next((value for rule, value in per_layer.items() if fnmatch.fnmatchcase(name, rule)), None)
        if layer_pattern is None:
            continue
        shared_with = [other for other in owners[id(module.weight)] if other != name]
        parent_name = name.rpartition(".")[0]
        parent = named.get(parent_name)
        reason = _left_dense_reason(name, module, parent, shared_with, named_by_user=include is not None)
        if reason is None:
            # a backward mask groups the output features too: both dimensions tile, as for transposable masks
            error = tiling_error(tuple(linear_weight(module).shape), layer_pattern.m,
                                 transposable=transposable or backward_mask)
            if error is not None:
                reason = f"weight {tuple(module.weight.shape)} does not tile at {layer_pattern} ({error.reason})"
        if reason is not None:
            left_dense.append(f"{name or type(module).__name__}: {reason}")
            if isinstance(parent, nn.MultiheadAttention):  # its input projection is no layer at all
                left_dense += [f"{parent_name}.{weight}: a parameter of nn.MultiheadAttention, not a "
                               "layer's weight (the attention multiplies by it directly)"
                               for weight, value in parent.named_parameters(recurse=False)
                               if weight.endswith("weight") and value is not None]
            continue
        if backward_mask and linear_weight(module).dim() > 2:
            raise ValueError(f"backward_mask=True applies to linear layers (their GEMMs are sparsify's own), but "
                             f"'{name}' is a {type(module).__name__}: exclude it (exclude=[{name!r}]) or sparsify "
                             "the convolutions in a call without backward_mask")
        chosen.append((name, module, layer_pattern))
    if left_dense:  # one summary, not a line per layer
        log.warning("sparsify: %d weight%s left dense: %s", len(left_dense), "s" * (len(left_dense) > 1),
                    "; ".join(left_dense))
    if not chosen:
        wanted = ", ".join(f"{rule}: {value}" for rule, value in per_layer.items()) if isinstance(
            pattern, Mapping) else str(next(iter(per_layer.values())))
        raise ValueError(f"no layer to sparsify at {wanted} (check include/exclude/filter_fn and the layer shapes)"
                         + (f"; left dense: {'; '.join(left_dense)}" if left_dense else ""))
    every = refresh_every if refresh_every is not None else (40 if transposable else 1)
    for name, module, layer_pattern in chosen:
        decay = 0.0 if gradient == "ste" else (
            srste_decay.get(name, SRSTE_DECAY) if isinstance(srste_decay, dict) else srste_decay)
        module.__class__ = _sparse_class(module)
        module._setup_sparse(layer_pattern, transposable, method, decay, every, refresh_method, backward_mask)
    _fused_encoders(model, enabled=False)
    return model


def _is_compressed(weight):
    """Whether a weight is one of PyTorch's semi-structured sparse tensors."""
    from torch.sparse import SparseSemiStructuredTensor

    return isinstance(weight, SparseSemiStructuredTensor)


def _fused_encoders(model, enabled):
    """Turn PyTorch's fused encoder path off where sparse layers live (``enabled=False``),
    or back on (``export``) where no layer is sparse or compressed.

    In ``eval()`` under ``no_grad``, ``nn.TransformerEncoderLayer`` hands ``linear1`` and
    ``linear2``'s weights to one fused kernel without calling those layers, so their masks
    would be ignored, and ``nn.TransformerEncoder`` packs inputs into nested tensors for that
    kernel, which cannot take a compressed (``export(compress=True)``) weight either. An
    encoder layer takes the fused path only if its activation code is non-zero (a check every
    torch version has), so zeroing it sends it through its own layers.
    """
    turned = []
    for name, module in model.named_modules():
        holds_sparse = any(isinstance(m, _SparseLayer) or _is_compressed(getattr(m, "weight", None))
                           for m in module.modules())
        if isinstance(module, nn.TransformerEncoderLayer):
            if not enabled and holds_sparse and module.activation_relu_or_gelu:
                module._fused_activation, module.activation_relu_or_gelu = module.activation_relu_or_gelu, 0
                turned.append(name or "the model")
            elif enabled and not holds_sparse and hasattr(module, "_fused_activation"):
                module.activation_relu_or_gelu = module.__dict__.pop("_fused_activation")
        elif isinstance(module, nn.TransformerEncoder):
            if not enabled and holds_sparse and getattr(module, "use_nested_tensor", False):
                module._fused_nested, module.use_nested_tensor = True, False
            elif enabled and not holds_sparse and module.__dict__.pop("_fused_nested", False):
                module.use_nested_tensor = True
    if turned:
        log.info("sparsify: PyTorch's fused encoder path is off for %s (it would read linear1/linear2's dense "
                 "weights and ignore their masks); export() turns it back on", ", ".join(turned))


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
    ``||S_new - S_old||_1``, per layer and in total. A refresh with an approximate solver
    (the greedy, the default for transposable masks) keeps, per tile, whichever of the
    current and the newly solved mask keeps more of the current ``|W|`` (see
    ``better_mask`` of the sparse layers); exact refreshes are the best mask of every tile
    already. So a refresh never makes a mask worse and flips nothing while the weights
    stand still.

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
                whole = layer._whole_weight()  # once: gathering a sharded weight is a collective
                method = resolve_method(layer.refresh_method if layer.transposable else "auto", layer.pattern,
                                        transposable=layer.transposable)
                new = layer.solve_mask(method, whole)
                if layer.transposable and not solvers.TRANSPOSABLE[method].EXACT:
                    # An exact solve is already the best mask of every tile (row-wise refreshes,
                    # every step, pay nothing); only an approximate one can lose to the mask in place.
                    new = layer.better_mask(new, whole)
                layer.mask.copy_(new)
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


def restore_sparse(model, source, *, pattern=None, transposable=None, **options):
    """Make a dense model sparse again as it was saved, masks included, and load the save.

    For a sparsified model saved with ``save_pretrained`` or ``torch.save(model.state_dict())``
    (its ``*.mask`` buffers are in the save; a plain ``from_pretrained`` ignores them and
    hands back a dense model): every layer with a saved mask is sparsified with that
    mask, and every tensor of ``source`` is loaded, so training resumes where it stopped.

    Parameters
    ----------
    model : nn.Module
        The dense architecture (e.g. from ``from_pretrained(folder)``); changed in place.
    source : dict, str or Path
        A state dict, a checkpoint file (``.safetensors``, sharded index, ``.pt``/``.bin``),
        or a model folder written by ``save_pretrained``.
    pattern : str or tuple, optional
        The N:M pattern; default: read from each mask (the smallest M its groups fit).
    transposable : bool, optional
        Default: whether each mask is transposable at its pattern.
    **options
        Passed to :func:`sparsify` (``gradient``, ``srste_decay``, ``refresh_every``, ...),
        which are not saved with the masks.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        If ``source`` holds no mask (an exported model: ``sparsify`` it instead), a mask
        names no prunable layer of ``model``, a mask fits no N:M pattern (or not the one
        given), or ``source`` holds tensors ``model`` does not have.

    Examples
    --------
    >>> import torch
    >>> make = lambda: torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    >>> state = sparsify(make(), "4:8").state_dict()
    >>> model = restore_sparse(make(), state)
    >>> [(name, str(layer.pattern)) for name, layer in sparse_layers(model)], torch.equal(model[0].mask, state["0.mask"])
    ([('0', '4:8'), ('2', '4:8')], True)
    """
    state = _read_state(source)
    masks = {key[:-len("mask")].rstrip("."): value for key, value in state.items()
             if key == "mask" or key.endswith(".mask")}
    if not masks:
        raise ValueError(f"{_describe(source)} holds no '*.mask' tensors: it was not saved from a sparsified model "
                         "(export() removes the masks); call sparsify(model, pattern) instead")
    named = dict(model.named_modules())
    layers = {}  # name -> (pattern, transposable)
    for name, keep in masks.items():
        layer = named.get(name)
        if layer is None or not prunable(layer):
            raise ValueError(f"{_describe(source)} has a mask for '{name}', which is not a linear or conv layer of "
                             "the model; restore into the architecture that was saved")
        view = keep.bool().t() if is_conv1d(layer) else keep.bool()
        found = _mask_pattern(view, pattern, transposable)
        if found is None:
            wanted = f"{pattern}{'' if transposable is None else (' transposable' if transposable else ' row-wise')}"
            raise ValueError(f"the mask of '{name}' {'fits no N:M pattern' if pattern is None else 'is not ' + wanted}"
                             "; pass the pattern= (and transposable=) it was trained with")
        layers[name] = found
    known = set(model.state_dict()) | {f"{name}.mask" if name else "mask" for name in masks}
    unexpected = [key for key in state if key not in known]
    if unexpected:  # checked before the model is touched
        raise ValueError(f"{_describe(source)} holds tensors the model does not have: {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''}; restore into the architecture that was saved")
    sparsify_layers(model, layers, **options)
    model.load_state_dict(dict(state), strict=False)
    return model


def sparsify_layers(model, layers, **options):
    """Sparsify exactly the named layers, each with its own pattern, in place.

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned.
    layers : dict
        Layer names (``model.named_modules()``) to ``(pattern, transposable)``.
    **options
        Passed to :func:`sparsify` (``gradient``, ``refresh_every``, ...).

    Returns
    -------
    nn.Module
        ``model``.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    >>> model = sparsify_layers(model, {"1": ("4:8", False)})
    >>> [(name, str(layer.pattern), layer.transposable) for name, layer in sparse_layers(model)]
    [('1', '4:8', False)]
    """
    for transposable in {t for _, t in layers.values()}:
        chosen = {glob.escape(name): p for name, (p, t) in layers.items() if t == transposable}
        sparsify(model, chosen, transposable=transposable, include=list(chosen), **options)
    return model


def _describe(source):
    return f"'{source}'" if isinstance(source, (str, Path)) else "the state dict"


def _read_state(source):
    """Every tensor of a state dict, checkpoint file or model folder, read safely."""
    if isinstance(source, Mapping):
        return source
    from .formats import find_checkpoint, format_of

    path = Path(source)
    path, kind = find_checkpoint(path) if path.is_dir() else (path, format_of(path))
    return {name: torch.as_tensor(kind.read_tensor(path, name)[0]) for name in kind.names(path)}


def _mask_pattern(keep, pattern, transposable):
    """``(pattern, transposable)`` that a mask ``(out, in[, *kernel])`` meets exactly, or None:
    the given ones, else the smallest M whose groups along ``in`` all keep the same N."""
    inp = keep.shape[1]
    if pattern is not None:
        candidates = [parse_pattern(pattern)]
    else:
        kept = int(keep.sum())
        candidates = [parse_pattern((kept * m // keep.numel(), m)) for m in range(2, inp + 1)
                      if inp % m == 0 and (kept * m) % keep.numel() == 0 and 0 < kept * m // keep.numel() < m]

    def fits(p, tiles):
        if tiling_error(tuple(keep.shape), p.m, transposable=tiles) is not None:
            return False
        blocks = Layout(tuple(keep.shape), p.m, transposable=tiles, pad=False).blocks(keep).long()
        counts = (blocks.sum(dim=1), blocks.sum(dim=3)) if tiles else (blocks.sum(dim=1),)
        return all(bool((c == p.n).all()) for c in counts)

    for p in candidates:
        if transposable is not False and fits(p, True):
            return p, True
        if transposable is not True and fits(p, False):
            return p, False
    return None


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
        ``nn.TransformerEncoderLayer``'s fused path, which cannot take them, then stays off
        where they live.

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
                semi_structured, _ = _semi_structured_class(layer.weight.device)
                layer.weight = nn.Parameter(_compress(layer.weight.detach(), semi_structured), requires_grad=False)
            else:
                log.info("%s: kept dense: %s", name, reason)
    _fused_encoders(model, enabled=True)
    return model
