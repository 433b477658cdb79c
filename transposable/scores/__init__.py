"""The scores of calibrated pruning: one module each, registered in :data:`SCORES`.

A score is the step of :func:`transposable.prune.prune` that chooses one layer's mask and
reconstructs what it keeps. Every score module has the same names, so the block walker,
the channel permutations, the folder writer and the ``prune`` command loop over the
registry and know no score by name:

``NEEDS``
    The statistics of the layer's calibration inputs it reads, from
    :data:`~transposable.scores.base.STATISTICS` (the walker gathers those, and only those,
    into a :class:`~transposable.scores.base.LayerStatistics`).
``LINEAR_ONLY``
    Whether it is defined for linear layers only (not convolutions).
``CHANGES_BIAS``
    Whether it rewrites the biases of the layers it prunes (the folder writer then writes
    them too).
``OPTIONS``
    Its own options, ``{name: Option(default, help, kind)}``: checked by
    :class:`transposable.prune.PruneRecipe`, offered by the command as ``--name``.
``importance(weight, stats, options) -> Tensor``
    Every weight's importance, ``(out, in)`` in ``weight``'s dtype: what the channel
    permutations try to keep.
``input_priority(stats) -> Tensor or None``
    A weight per input feature when the score walks a layer's inputs in order (the
    permutations then place heavy groups first), else None.
``prune(layer, weight, stats, recipe) -> (keep, new_weight or None, new_bias or None)``
    The mask of ``layer``'s ``weight`` (float32, ``(out, in)``) and the reconstructed weight
    and bias (None: the masked weight, the bias unchanged). ``stats`` may be shared with
    other layers that read the same inputs (q, k and v): what a score derives from them
    (a Hessian's factorization) it caches with ``stats.derived``.

Adding a score is one module with these names and one line in ``SCORES``.
"""
from . import adaprune, alps, magnitude, sparsegpt, wanda

#: Every score, by the name ``score=`` and ``--score`` take, in the order the docs list them.
SCORES = {
    "sparsegpt": sparsegpt,
    "wanda": wanda,
    "magnitude": magnitude,
    "adaprune": adaprune,
    "alps": alps,
}

__all__ = ["SCORES", "adaprune", "alps", "magnitude", "sparsegpt", "wanda"]
