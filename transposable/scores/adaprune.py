"""AdaPrune (Hubara et al., NeurIPS 2021): magnitude masks, then the kept weights and the bias
fitted with Adam so that the layer's outputs match the dense model's on the same inputs."""
from . import magnitude
from .base import Option
from .magnitude import importance, input_priority  # noqa: F401  (its masks are magnitude masks)

NEEDS = frozenset({"inputs", "dense_outputs"})
LINEAR_ONLY = False
CHANGES_BIAS = True
OPTIONS = {"steps": Option(200, "Adam steps per layer", "positive integer"),
           "lr": Option(1e-3, "Adam's learning rate", "positive")}


def prune(layer, weight, stats, recipe):
    """Choose the magnitude mask, then fit the kept weights and the bias (:func:`fit`).

    Parameters
    ----------
    layer : nn.Module
        The layer (its parameters are not changed here).
    weight : Tensor, shape (out, in)
        The layer's weight in the ``(out, in)`` convention, float32.
    stats : LayerStatistics
        The layer's calibration statistics (``inputs``, ``dense_outputs`` and the ``layer``).
    recipe : PruneRecipe
        The pattern, solver and options.

    Returns
    -------
    keep : Tensor of bool, shape (out, in)
        The mask.
    weight : Tensor or None
        The fitted weight, zero where pruned.
    bias : Tensor or None
        The fitted bias (None for a layer without one).

    Examples
    --------
    >>> import torch
    >>> from transposable.prune import PruneRecipe
    >>> from transposable.scores.base import LayerStatistics
    >>> _ = torch.manual_seed(0)
    >>> layer = torch.nn.Linear(8, 8)
    >>> stats = LayerStatistics(NEEDS)
    >>> x = torch.randn(32, 8)
    >>> stats.add(x)
    >>> stats.dense_outputs = [layer(x).detach()]
    >>> keep, new, bias = prune(layer, layer.weight.detach(), stats, PruneRecipe("2:4", score="adaprune",
    ...                                                                   options={"steps": 5}))
    >>> bool((new[~keep] == 0).all()), tuple(bias.shape)
    (True, (8,))
    """
    from ..layers import as_stored

    keep, _, _ = magnitude.prune(layer, weight, stats, recipe)
    bias = None if layer.bias is None else layer.bias.detach().float().clone()
    fitted, fitted_bias = fit(layer, as_stored(layer, keep.to(weight.dtype)), as_stored(layer, weight * keep), bias,
                              stats.inputs, stats.dense_outputs, recipe.options["steps"], recipe.options["lr"])
    return keep, as_stored(layer, fitted), fitted_bias


def fit(layer, keep, masked, bias, inputs, targets, steps, lr):
    """Fit the kept weights and the bias with Adam to the dense model's outputs.

    The layer's outputs on ``inputs`` are fitted to ``targets`` (mean squared error).

    Parameters
    ----------
    layer : nn.Module
        The layer (its own parameters are not touched).
    keep : Tensor
        The mask as 0/1 floats, laid out as the layer stores its weight.
    masked : Tensor
        The masked weight, laid out so.
    bias : Tensor or None
        The bias to start from.
    inputs, targets : list of Tensor
        The layer's calibration inputs and the dense model's outputs on them.
    steps : int
        Adam steps.
    lr : float
        Adam's learning rate.

    Returns
    -------
    weight : Tensor
        The fitted weight, zero where pruned, laid out as stored.
    bias : Tensor or None
        The fitted bias.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(4, 2)
    >>> x = [torch.randn(16, 4)]
    >>> keep = torch.tensor([[1., 1, 0, 0], [0, 0, 1, 1]])
    >>> weight, bias = fit(layer, keep, layer.weight.detach() * keep, None, x, [layer(x[0]).detach()], 5, 1e-2)
    >>> bool((weight[keep == 0] == 0).all())
    True
    """
    import torch

    from ..layers import layer_outputs

    weight = masked.clone().requires_grad_(True)
    trainable = [weight]
    fitted_bias = None
    if bias is not None:
        fitted_bias = bias.clone().requires_grad_(True)
        trainable.append(fitted_bias)
    optimizer = torch.optim.Adam(trainable, lr=lr)
    targets = [y.float() for y in targets]
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum((layer_outputs(layer, weight * keep, fitted_bias, x) - y).pow(2).mean()
                       for x, y in zip(inputs, targets)) / len(inputs)
            loss.backward()
            optimizer.step()
    return (weight * keep).detach(), None if fitted_bias is None else fitted_bias.detach()
