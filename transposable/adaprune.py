"""AdaPrune (Hubara et al., 2021): convert a trained layer to N:M with a little data.

Layer by layer, the N:M mask is fixed (the exact best mask of the trained weight) and the
kept weights and bias are fitted so that the layer's outputs on a small calibration set
match the original layer's: ``min ||f(X; W * S, b) - f_orig(X_orig)||^2`` with Adam. The
inputs ``X`` come from the model pruned so far, so each layer also corrects the error of
the layers before it. Batch-norm statistics can then be re-estimated on the same data.
"""
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .layout import tiling_error
from .masks import mask as solve_mask
from .patterns import parse_pattern

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerReport:
    """Reconstruction error of one layer on the calibration data (mean squared error).

    Parameters
    ----------
    name : str
        The layer's name in ``model.named_modules()``.
    mse_magnitude : float
        Error with the mask applied to the trained weights, nothing fitted.
    mse_adaprune : float
        Error after fitting the kept weights and bias.

    Examples
    --------
    >>> LayerReport("0", 0.5, 0.1).mse_adaprune < LayerReport("0", 0.5, 0.1).mse_magnitude
    True
    """

    name: str
    mse_magnitude: float  # the mask applied to the trained weights, nothing fitted
    mse_adaprune: float  # after fitting the kept weights and bias


def adaprune(model, calibration, pattern, *, transposable=True, method="auto", layers=None, steps=200,
             lr=1e-3, recalibrate_batchnorm=True, report=None):
    """Prune a trained model's layers to N:M and fit what is kept to the original outputs.

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned. Its ``nn.Linear`` and ``nn.Conv{1,2,3}d`` weights
        (shape ``(out, in[, *kernel])``, groups along ``in``) are pruned.
    calibration : iterable
        Batches of model inputs (a tensor, or a tuple/list whose first item is the input);
        iterated once per layer, so a list is best. About one sample per class suffices.
    pattern : str or tuple
        ``"2:4"`` etc.
    transposable : bool, default True
        Transposable N:M masks (else row-wise N:M).
    method : str, default "auto"
        Transposable mask solver.
    layers : sequence of str, optional
        Names (as in ``model.named_modules()``) of the layers to prune; default: every
        prunable layer whose shape tiles.
    steps : int, default 200
        Adam steps per layer, full batch over the calibration data.
    lr : float, default 1e-3
        Adam's learning rate.
    recalibrate_batchnorm : bool, default True
        Re-estimate batch-norm running statistics on the calibration data afterwards.
    report : list, optional
        If given, one :class:`LayerReport` per pruned layer is appended.

    Returns
    -------
    nn.Module
        ``model``, with exact zeros where its masks prune.

    Raises
    ------
    ValueError
        If ``layers`` names a module that is missing, not prunable, or does not tile, or the
        calibration data is empty.

    References
    ----------
    Hubara et al., "Accelerated Sparse Neural Training: A Provable and Efficient Method to
    Find N:M Transposable Masks", NeurIPS 2021 (AdaPrune).

    Examples
    --------
    >>> import torch
    >>> torch.manual_seed(0) is not None
    True
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> data = [torch.randn(16, 8)]
    >>> model = adaprune(model, data, "2:4", layers=["0"], steps=20)
    >>> int((model[0].weight != 0).sum())
    32
    """
    pattern = parse_pattern(pattern)
    batches = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in calibration]
    if not batches:
        raise ValueError("calibration holds no batches; pass a list of input tensors")
    modules = dict(model.named_modules())
    names = list(layers) if layers is not None else [n for n, m in modules.items() if isinstance(m, PRUNABLE)
                                                     and _tiles(m.weight, pattern, transposable)]
    for name in names:
        module = modules.get(name)
        if not isinstance(module, PRUNABLE):
            raise ValueError(f"layer {name!r} is {'missing' if module is None else type(module).__name__}; "
                             f"prunable layers are Linear and Conv1d/2d/3d")
        if not _tiles(module.weight, pattern, transposable):
            raise ValueError(f"layer {name!r} has weight shape {tuple(module.weight.shape)}, which does not "
                             f"tile at {pattern}; leave it out of layers=")

    original = copy.deepcopy(model).eval()
    was_training = model.training
    model.eval()
    for name in names:
        layer = modules[name]
        inputs = _layer_inputs(model, layer, batches)
        reference = original.get_submodule(name)
        with torch.no_grad():
            targets = [reference(x) for x in _layer_inputs(original, reference, batches)]
        with torch.no_grad():
            weight = layer.weight.detach()
            mask = solve_mask(weight, pattern, transposable=transposable, method=method).to(weight.dtype)
        before = _fit(layer, mask, inputs, targets, steps, lr)
        if report is not None:
            report.append(LayerReport(name, before, _mse(layer, mask, inputs, targets)))
    if recalibrate_batchnorm:
        recalibrate_batch_norm(model, batches)
    model.train(was_training)
    return model


def recalibrate_batch_norm(model, batches):
    """Re-estimate every batch-norm layer's running statistics on some batches.

    The statistics become the plain (cumulative) average over ``batches``; the weights do
    not change.

    Parameters
    ----------
    model : nn.Module
        Changed in place.
    batches : iterable of Tensor
        Model inputs.

    Returns
    -------
    nn.Module
        ``model``.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    >>> data = [torch.randn(16, 4)]
    >>> _ = recalibrate_batch_norm(model, data)
    >>> torch.allclose(model[1].running_mean, model[0](data[0]).mean(0).detach(), atol=1e-6)
    True
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m, m.momentum, m.training) for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for norm, momentum, training in saved:
        norm.momentum = momentum
    model.train(was_training)
    return model


def _tiles(weight, pattern, transposable):
    return weight.dim() >= 2 and tiling_error(weight.shape, pattern.m, transposable=transposable) is None


def _layer_inputs(model, layer, batches):
    """The inputs ``layer`` receives when ``model`` runs on each batch."""
    captured = []
    handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        handle.remove()
    return captured


def _mse(layer, mask, inputs, targets):
    params = {"weight": layer.weight * mask}
    with torch.no_grad():
        errors = [(functional_call(layer, params, (x,)) - y).pow(2).mean() for x, y in zip(inputs, targets)]
    return float(sum(errors) / len(errors))


def _fit(layer, mask, inputs, targets, steps, lr):
    """Fit the kept weights and the bias with Adam; returns the error before fitting."""
    before = _mse(layer, mask, inputs, targets)
    weight = (layer.weight.detach() * mask).clone().requires_grad_(True)
    params = {"weight": weight}
    trainable = [weight]
    if layer.bias is not None:
        params["bias"] = layer.bias.detach().clone().requires_grad_(True)
        trainable.append(params["bias"])
    optimizer = torch.optim.Adam(trainable, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum((functional_call(layer, {**params, "weight": weight * mask}, (x,)) - y).pow(2).mean()
                   for x, y in zip(inputs, targets)) / len(inputs)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        layer.weight.copy_(weight * mask)
        if layer.bias is not None:
            layer.bias.copy_(params["bias"])
    return before
