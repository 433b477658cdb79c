"""Magnitude: keep the largest ``|W|``; nothing reconstructed, no calibration statistic."""
from ..masks import mask

NEEDS = frozenset()
LINEAR_ONLY = False
CHANGES_BIAS = False
OPTIONS = {}


def importance(weight, stats, options):
    """Return ``|W|``: every weight's importance.

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        The layer's weight in the ``(out, in)`` convention, any float dtype.
    stats : LayerStatistics
        The layer's calibration statistics (unused).
    options : mapping
        The score's options (none).

    Returns
    -------
    Tensor, shape (out, in)
        Non-negative, in ``weight``'s dtype.

    Examples
    --------
    >>> import torch
    >>> importance(torch.tensor([[-2.0, 1.0]]), None, {}).tolist()
    [[2.0, 1.0]]
    """
    return weight.abs()


def input_priority(stats):
    """Return None: no order of the input features matters to this score.

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
    """Choose the mask of ``|W|``; the kept weights stay as they are.

    Parameters
    ----------
    layer : nn.Module
        The layer (its parameters are not changed here).
    weight : Tensor, shape (out, in)
        The layer's weight in the ``(out, in)`` convention, float32.
    stats : LayerStatistics
        The layer's calibration statistics (unused).
    recipe : PruneRecipe
        The pattern, solver and options.

    Returns
    -------
    keep : Tensor of bool, shape (out, in)
        The mask.
    weight : Tensor or None
        None: the masked weight.
    bias : Tensor or None
        None: unchanged.

    Examples
    --------
    >>> import torch
    >>> from transposable.prune import PruneRecipe
    >>> keep, new, bias = prune(None, torch.tensor([[1.0, 4.0, 2.0, 3.0]]), None, PruneRecipe("2:4", score="magnitude",
    ...                                                                                  transposable=False))
    >>> keep.tolist(), new, bias
    ([[False, True, False, True]], None, None)
    """
    return mask(weight, recipe.pattern, transposable=recipe.transposable, method=recipe.method), None, None
