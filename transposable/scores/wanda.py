"""Wanda (Sun et al., ICLR 2024): ``|W_ij| * ||X_j||_2``, weights times the norm of their input
feature over the calibration tokens; nothing reconstructed."""
from ..masks import mask

NEEDS = frozenset({"sum_squares"})
LINEAR_ONLY = True
CHANGES_BIAS = False
OPTIONS = {}


def importance(weight, stats, options):
    """Return ``|W_ij| * ||X_j||_2``, the input feature's norm as a root mean square over the tokens.

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        The layer's weight in the ``(out, in)`` convention, any float dtype.
    stats : LayerStatistics
        The layer's calibration statistics (``sum_squares`` and ``tokens``).
    options : mapping
        The score's options (none).

    Returns
    -------
    Tensor, shape (out, in)
        Non-negative, in ``weight``'s dtype.

    Examples
    --------
    >>> import torch
    >>> from transposable.scores.base import LayerStatistics
    >>> stats = LayerStatistics(NEEDS)
    >>> stats.add(torch.tensor([[3.0, 0.0], [3.0, 2.0]]))
    >>> importance(torch.tensor([[1.0, -1.0]]), stats, {}).tolist()
    [[3.0, 1.4142135381698608]]
    """
    return weight.abs() * (stats.sum_squares / max(stats.tokens, 1)).sqrt().to(weight)[None, :]


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
    """Choose the mask of :func:`importance`; the kept weights stay as they are.

    Parameters
    ----------
    layer : nn.Module
        The layer (its parameters are not changed here).
    weight : Tensor, shape (out, in)
        The layer's weight in the ``(out, in)`` convention, float32.
    stats : LayerStatistics
        The layer's calibration statistics (``sum_squares`` and ``tokens``).
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
    >>> from transposable.scores.base import LayerStatistics
    >>> stats = LayerStatistics(NEEDS)
    >>> stats.add(torch.tensor([[1.0, 1.0, 9.0, 9.0]]))  # the last two inputs are large
    >>> keep, _, _ = prune(None, torch.tensor([[4.0, 3.0, 1.0, 2.0]]), stats, PruneRecipe("2:4", score="wanda",
    ...                                                                            transposable=False))
    >>> keep.tolist()
    [[False, False, True, True]]
    """
    scores = importance(weight, stats, recipe.options)
    return mask(weight, recipe.pattern, transposable=recipe.transposable, method=recipe.method, scores=scores), None, \
        None
