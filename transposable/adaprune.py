"""AdaPrune (Hubara et al., 2021): convert a trained model to N:M with a little data.

Layer by layer the N:M mask is fixed (the exact best mask of the trained weight) and the
kept weights and bias are fitted so that the layer's outputs on a small calibration set
match the dense model's: ``min ||f(X; W * S, b) - f_dense(X_dense)||^2`` with Adam. ``X``
comes from the model pruned so far, so each layer also corrects the error of the layers
before it. It runs on :func:`transposable.prune.prune` (``score="adaprune"``): one block at
a time, no copy of the model. Batch-norm statistics can then be re-estimated on the same
data.
"""
from torch import nn

from .prune import LayerReport, prune

__all__ = ["LayerReport", "adaprune", "recalibrate_batch_norm"]


def adaprune(model, calibration, pattern, *, transposable=True, method="auto", layers=None, steps=200, lr=1e-3,
             recalibrate_batchnorm=True, report=None, blocks=None):
    """Prune a trained model's layers to N:M and fit what is kept to the dense outputs.

    Parameters
    ----------
    model : nn.Module
        Changed in place and returned. Its ``nn.Linear``, ``Conv1D`` and ``nn.Conv{1,2,3}d``
        weights (``(out, in[, *kernel])``, groups along ``in``) inside its blocks are pruned;
        an ``nn.Sequential``'s children are its blocks.
    calibration : iterable
        Batches of model inputs (a tensor, a tuple/list of positional inputs, or a dict of
        keyword inputs). About one sample per class suffices.
    pattern : str or tuple
        ``"2:4"`` etc.
    transposable : bool, default True
        Transposable N:M masks (else row-wise N:M).
    method : str, default "auto"
        Transposable mask solver.
    layers : sequence of str, optional
        Names (or glob patterns) of the layers to prune; default: every prunable layer
        whose shape tiles (the others are reported as left dense).
    steps : int, default 200
        Adam steps per layer, full batch over the calibration data.
    lr : float, default 1e-3
        Adam's learning rate.
    recalibrate_batchnorm : bool, default True
        Re-estimate batch-norm running statistics on the calibration data afterwards.
    report : list, optional
        If given, one :class:`LayerReport` per prunable layer is appended (``error_masked``:
        the mask alone; ``error``: after fitting).
    blocks : str or sequence of nn.Module, optional
        The model's blocks, as in :func:`transposable.prune.prune`.

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
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> data = [torch.randn(16, 8)]
    >>> model = adaprune(model, data, "2:4", layers=["0"], steps=20)
    >>> int((model[0].weight != 0).sum())
    32
    """
    batches = list(calibration)
    prune(model, batches, pattern, transposable=transposable, score="adaprune", method=method, blocks=blocks,
          layers=layers, steps=steps, lr=lr, report=report)
    if recalibrate_batchnorm:
        recalibrate_batch_norm(model, batches)
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
    import torch

    from .prune import call_model

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in batches:
            call_model(model, batch)
    for norm, momentum in saved:
        norm.momentum = momentum
    model.train(was_training)
    return model
