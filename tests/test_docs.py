"""Every public function and class has a complete numpydoc docstring.

Checked with ``numpydoc.validate``: every check but SA01 (a See Also section) and ES01
(an extended summary), which numpydoc itself lists as optional, and GL01, a layout rule (the
summary on the line after the opening quotes) that contradicts PEP 257, which the code
follows, and that only some numpydoc releases apply. Every parameter, return value and raised
error is documented, and every public callable has an example.
"""
import importlib
import inspect

import pytest
from numpydoc.validate import validate

#: Modules whose public names (``__all__``, else what they define without a leading
#: underscore) are the library's API.
MODULES = [
    "transposable", "transposable.masks", "transposable.layout", "transposable.patterns",
    "transposable.diversity", "transposable.formats", "transposable.io", "transposable.convert",
    "transposable.adaprune", "transposable.prune", "transposable.permute", "transposable.pretrained",
    "transposable.finetune", "transposable.nn", "transposable.layers", "transposable.permutation",
    "transposable.folders", "transposable.scores", "transposable.scores.base", "transposable.scores.sparsegpt",
    "transposable.scores.wanda", "transposable.scores.magnitude", "transposable.scores.adaprune",
    "transposable.scores.alps",
    "transposable.solvers.permutation",
    "transposable.hf",
    "transposable.cli",
    "transposable.solvers", "transposable.solvers.rowwise", "transposable.solvers.greedy",
    "transposable.solvers.cyclecanceling", "transposable.solvers.exhaustive", "transposable.solvers.mincostflow",
]

OPTIONAL = {"SA01", "ES01", "GL01"}


def public_objects():
    found = {}
    for name in MODULES:
        module = importlib.import_module(name)
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, obj in vars(module).items() if not n.startswith("_")
                     and getattr(obj, "__module__", None) == name]
        for attribute in names:
            obj = getattr(module, attribute)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return sorted(found)


def inherits_its_constructor(qualified_name):
    """A class whose ``__init__`` is its base's (the sparse layers' is torch's): its
    constructor's parameters are documented there, not here."""
    module, _, name = qualified_name.rpartition(".")
    obj = getattr(importlib.import_module(module), name, None)
    return inspect.isclass(obj) and "__init__" not in vars(obj) and not hasattr(obj, "__dataclass_fields__")


@pytest.mark.parametrize("qualified_name", public_objects())
def test_numpydoc_is_complete(qualified_name):
    skip = OPTIONAL | ({"PR01"} if inherits_its_constructor(qualified_name) else set())
    errors = [f"{code}: {message}" for code, message in validate(qualified_name)["errors"] if code not in skip]
    assert not errors, "\n".join(errors)
