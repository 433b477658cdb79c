"""What every score module shares: its options, and the statistics of a layer's inputs.

A score module declares the statistics it needs (``NEEDS``, names from :data:`STATISTICS`)
and the block walker of :mod:`transposable.prune` gathers exactly those into a
:class:`LayerStatistics` per layer; it knows no score by name.
"""
import math
from typing import NamedTuple

#: What a score may ask the block walker for, per layer.
STATISTICS = {
    "sum_squares": "the sum over calibration tokens of every input feature's square (Wanda's norms)",
    "hessian": "X^T X of the calibration inputs, float64 (SparseGPT's Hessian)",
    "inputs": "every calibration batch's inputs (to fit the layer on them)",
    "dense_outputs": "the dense model's outputs of the layer, from a second stream of activations",
    "sums": "the sum over calibration tokens of every input feature, float64 (a bias's part in a refit)",
}


class Option(NamedTuple):
    """One option of a score: its default, what it does, and what values it takes.

    Parameters
    ----------
    default : int or float
        The value when none is given.
    help : str
        One line for ``--help`` and the docs.
    kind : {"non-negative", "positive", "positive integer"}
        The values it accepts.

    Examples
    --------
    >>> Option(0.01, "dampening", "non-negative").check("dampening", -1.0)
    Traceback (most recent call last):
    ...
    ValueError: dampening must be a non-negative number, got -1.0
    """

    default: object
    help: str
    kind: str

    def check(self, name, value):
        """Return ``value`` if it is one this option takes, else raise ``ValueError`` naming it.

        Parameters
        ----------
        name : str
            The option's name, for the message.
        value : object
            The value given.

        Returns
        -------
        int or float
            ``value``.

        Raises
        ------
        ValueError
            For a value of the wrong kind.
        """
        if self.kind == "positive integer":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (self.kind == "positive" and value == 0):
            raise ValueError(f"{name} must be a {self.kind} number, got {value!r}")
        return value


class LayerStatistics:
    """What a layer's calibration inputs tell a score, gathered batch by batch.

    Shared by the layers that read the same inputs (q, k and v): they describe inputs, not
    a layer.

    Parameters
    ----------
    needs : iterable of str
        The statistics to gather (keys of :data:`STATISTICS`; ``dense_outputs`` are set
        by the walker).

    Attributes
    ----------
    sample : Tensor
        The first batch's inputs (the reported errors are measured on them).
    tokens : int
        Calibration tokens seen (with ``sum_squares`` or ``hessian``).
    sum_squares, hessian, sums : Tensor or None
        Float64 sums, where needed.
    inputs : list of Tensor
        Every batch's inputs, where needed.
    dense_outputs : list of Tensor or None
        The dense model's outputs of the layer, where needed.

    Examples
    --------
    >>> import torch
    >>> stats = LayerStatistics({"sum_squares"})
    >>> stats.add(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    >>> stats.tokens, stats.sum_squares.tolist()
    (2, [10.0, 20.0])
    """

    def __init__(self, needs):
        self.needs = frozenset(needs)
        self.sample = None
        self.inputs = []
        self.tokens = 0
        self.sum_squares = None
        self.hessian = None
        self.sums = None
        self.dense_outputs = None
        self.moves = []  # permutations of the input features applied so far (permute=True)
        self._derived = {}

    def derived(self, key, compute):
        """What ``compute()`` returns, computed once per ``key`` for every layer that shares
        these statistics (a Hessian's factorization, read by q, k and v alike).

        Parameters
        ----------
        key : hashable
            Names the quantity and its options.
        compute : callable
            Computes it from these statistics.

        Returns
        -------
        object
            The cached value.
        """
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def add(self, x):
        """Take one batch of the layer's inputs ``(..., in)``.

        Parameters
        ----------
        x : Tensor
            The inputs, as the layer received them.
        """
        x = x.detach()
        if self.sample is None:
            self.sample = x
        if "inputs" in self.needs:
            self.inputs.append(x)
        if not self.needs & {"sum_squares", "hessian", "sums"}:
            return
        flat = x.reshape(-1, x.shape[-1]).float()
        self.tokens += flat.shape[0]
        # Accumulated in place: a new sum per batch, kept while the block's temporaries come
        # and go, would fragment the heap (measured: +30 % peak memory on SmolLM2).
        if "sum_squares" in self.needs:
            squares = flat.pow(2).sum(dim=0).double()
            if self.sum_squares is None:
                self.sum_squares = squares
            else:
                self.sum_squares += squares
        if "sums" in self.needs:
            sums = flat.sum(dim=0).double()
            if self.sums is None:
                self.sums = sums
            else:
                self.sums += sums
        if "hessian" in self.needs:
            product = (flat.t() @ flat).double()
            if self.hessian is None:
                self.hessian = product
            else:
                self.hessian += product

    def permute_inputs(self, positions):
        """Reorder every statistic along the input features, remembering it for
        :meth:`restore_inputs`.

        Parameters
        ----------
        positions : Tensor of int
            ``positions[i]``: the old feature now at ``i``.
        """
        self.moves.append(positions)
        self._reorder(positions)

    def restore_inputs(self):
        """Undo every :meth:`permute_inputs`."""
        import torch

        for positions in reversed(self.moves):
            self._reorder(torch.argsort(positions))
        self.moves = []

    def _reorder(self, positions):
        self._derived.clear()
        positions = positions.to(self.sample.device)  # statistics live beside the inputs
        self.sample = self.sample.index_select(-1, positions)
        self.inputs = [x.index_select(-1, positions) for x in self.inputs]
        if self.sum_squares is not None:
            self.sum_squares = self.sum_squares.index_select(0, positions)
        if self.sums is not None:
            self.sums = self.sums.index_select(0, positions)
        if self.hessian is not None:
            self.hessian = self.hessian.index_select(0, positions).index_select(1, positions)


def dampened(hessian, dampening):
    """Return ``H + dampening * mean(diag H) * I`` (a new tensor) and the dead inputs.

    Every input that is always zero (``dead``) gets a unit diagonal first: nothing to
    reconstruct from, and the matrix stays positive definite.

    Parameters
    ----------
    hessian : Tensor, shape (in, in)
        ``X^T X / tokens``.
    dampening : float
        The fraction of the mean diagonal added to the diagonal.

    Returns
    -------
    h : Tensor, shape (in, in)
        The dampened matrix, in ``hessian``'s dtype.
    dead : Tensor of bool, shape (in,)
        The inputs that are always zero.

    Examples
    --------
    >>> import torch
    >>> h, dead = dampened(torch.diag(torch.tensor([2.0, 0.0])), 0.5)
    >>> h.diag().tolist(), dead.tolist()
    ([2.75, 1.75], [False, True])
    """
    import torch

    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += dampening * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, dead
