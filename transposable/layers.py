"""What the library needs to know about a layer, below both pruning and training.

Which layers have an N:M weight (``nn.Linear`` and its subclasses, GPT-2 style ``Conv1D``,
``nn.Conv{1,2,3}d``), their weight in the library's ``(out, in[, *kernel])`` convention
(``Conv1D`` stores ``(in, out)``), and a layer computed with another weight and bias.
"""
from torch import nn
from torch.func import functional_call

#: Convolutions: N:M along their input channels (each kernel tap an ``(out, in)`` matrix).
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable(module):
    """Whether pruning (and ``sparsify``) can make this layer N:M.

    ``nn.Linear`` and its subclasses, Hugging Face / GPT-2 ``Conv1D`` (recognised without
    importing transformers) and ``nn.Conv{1,2,3}d``.

    Parameters
    ----------
    module : nn.Module
        Any module.

    Returns
    -------
    bool
        True for the layer types above.

    Examples
    --------
    >>> import torch
    >>> prunable(torch.nn.Linear(4, 4)), prunable(torch.nn.LayerNorm(4))
    (True, False)
    """
    return isinstance(module, (nn.Linear, *CONVOLUTIONS)) or is_conv1d(module)


def is_conv1d(module):
    """Whether ``module`` is a GPT-2 style ``Conv1D``: a linear layer stored ``(in, out)``.

    Recognised by its class name and attribute, without importing transformers.

    Parameters
    ----------
    module : nn.Module
        Any module.

    Returns
    -------
    bool
        True for ``transformers.pytorch_utils.Conv1D`` and look-alikes.

    Examples
    --------
    >>> import torch
    >>> is_conv1d(torch.nn.Linear(4, 4))
    False
    """
    return (any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) and hasattr(module, "nf")
            and getattr(module, "weight", None) is not None)


def linear_weight(module):
    """A layer's weight as ``(out, in[, *kernel])``: the transpose for ``Conv1D``.

    Parameters
    ----------
    module : nn.Module
        A :func:`prunable` layer.

    Returns
    -------
    Tensor
        A view of the weight (not a copy).

    Examples
    --------
    >>> import torch
    >>> tuple(linear_weight(torch.nn.Linear(4, 8)).shape)
    (8, 4)
    """
    return module.weight.t() if is_conv1d(module) else module.weight


def as_stored(module, weight):
    """A tensor in the ``(out, in)`` convention, laid out as ``module`` stores its weight.

    Parameters
    ----------
    module : nn.Module
        A :func:`prunable` layer.
    weight : Tensor
        Shaped as :func:`linear_weight` of ``module``.

    Returns
    -------
    Tensor
        ``weight``, transposed for ``Conv1D`` (a view).

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(4, 8)
    >>> as_stored(layer, linear_weight(layer)) is layer.weight
    True
    """
    return weight.t() if is_conv1d(module) else weight


def layer_outputs(module, weight, bias, x):
    """Compute ``module`` on ``x`` (as float32) with ``weight`` and ``bias`` in place of its own.

    Parameters
    ----------
    module : nn.Module
        A :func:`prunable` layer.
    weight : Tensor
        As the layer stores its weight.
    bias : Tensor or None
        Its bias, or None for a layer without one.
    x : Tensor
        Inputs.

    Returns
    -------
    Tensor
        The outputs; the module's own parameters are not touched.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(2, 1)
    >>> layer_outputs(layer, torch.ones(1, 2), torch.zeros(1), torch.tensor([[1., 2.]])).tolist()
    [[3.0]]
    """
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return functional_call(module, params, (x.float(),))
