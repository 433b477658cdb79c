"""The package's layers, as ``docs/architecture.md`` draws them: every import between two
parts of the package points to a lower layer (so there is no import cycle), and no part
reaches for another part's private names or private modules. The table in the document is
the one this test reads, so the picture and the code cannot drift apart."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def layers(root=ROOT):
    """``{part: layer}`` from the table of docs/architecture.md (``| 3 | `nn`, `scores` | ...``)."""
    table = {}
    for line in (root / "docs" / "architecture.md").read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for part in re.findall(r"`([\w.]+)`", row.group(2)):
                table[part] = int(row.group(1))
    return table


def part_of(dotted):
    """The part a module belongs to: ``transposable.scores.wanda`` -> ``scores``."""
    pieces = dotted.split(".")
    return pieces[1] if len(pieces) > 1 else "transposable"


def module_name(path, root):
    relative = path.relative_to(root).with_suffix("")
    pieces = list(relative.parts)
    if pieces[-1] == "__init__":
        pieces.pop()
    return ".".join(pieces)


def resolve(node, importer, is_package, root):
    """The absolute modules an ``import``/``from ... import`` names, with the names taken."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names if alias.name.startswith("transposable")]
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level:
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("transposable"):
        return []
    found = []
    for alias in node.names:
        submodule = f"{target}.{alias.name}"
        is_module = (root / Path(*submodule.split("."))).with_suffix(".py").exists() or \
            (root / Path(*submodule.split("."))).is_dir()
        found.append((submodule, None) if is_module else (target, alias.name))
    return found


def imports(root):
    """Every import inside the package (module level and inside functions):
    ``(importer, imported module, name or None, line, path)``."""
    edges = []
    for path in sorted((root / "transposable").rglob("*.py")):
        importer = module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in resolve(node, importer, path.name == "__init__.py", root):
                    edges.append((importer, target, name, node.lineno, path.relative_to(root)))
    return edges


def upward_imports(root):
    """Imports between parts that do not point to a lower layer."""
    table = layers(root)
    upward = []
    for importer, target, name, line, path in imports(root):
        source, destination = part_of(importer), part_of(target)
        if source == destination or source == "transposable":  # the root's lazy exports face users
            continue
        if destination == "transposable":
            if name != "__version__":
                upward.append(f"{path}:{line} imports {name} from the package root")
        elif table[destination] >= table[source]:
            upward.append(f"{path}:{line}: {source} (layer {table[source]}) imports {target} "
                          f"({destination}, layer {table[destination]})")
    return upward


def private_uses(root):
    """Imports of another part's private modules or names, and ``module._name`` on them."""
    private = []
    for importer, target, name, line, path in imports(root):
        if part_of(importer) == part_of(target):
            continue
        if any(piece.startswith("_") for piece in target.split(".")[2:]):
            private.append(f"{path}:{line} imports the private module {target}")
        if name is not None and name.startswith("_") and name != "__version__":
            private.append(f"{path}:{line} imports the private name {target}.{name}")
    for path in sorted((root / "transposable").rglob("*.py")):
        importer = module_name(path, root)
        tree = ast.parse(path.read_text())
        foreign = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in resolve(node, importer, path.name == "__init__.py", root):
                    if name is None and part_of(target) != part_of(importer):
                        foreign[target.rsplit(".", 1)[-1]] = target
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in foreign \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                private.append(f"{path.relative_to(root)}:{node.lineno} uses {foreign[node.value.id]}.{node.attr}")
    return private


def test_every_part_of_the_package_has_a_layer():
    table = layers()
    parts = {part_of(module_name(path, ROOT)) for path in (ROOT / "transposable").rglob("*.py")} - {"transposable"}
    assert parts <= set(table), f"parts with no layer in docs/architecture.md: {parts - set(table)}"
    assert set(table) <= parts, f"docs/architecture.md names parts that do not exist: {set(table) - parts}"


def test_imports_point_down_the_layers():
    assert not upward_imports(ROOT), "\n".join(upward_imports(ROOT))


def test_no_part_uses_another_parts_private_names():
    assert not private_uses(ROOT), "\n".join(private_uses(ROOT))


@pytest.mark.parametrize("planted,check", [("from .cli import main", upward_imports),
                                           ("from . import nn", upward_imports),
                                           ("from .prune import _targets", private_uses),
                                           ("from .solvers._jit import jit", private_uses),
                                           ("from .formats import torch_file\ntorch_file._flatten", private_uses)])
def test_the_checks_catch_what_they_look_for(planted, check, tmp_path):
    """An upward import or a private name, planted in a copy of the package, is caught."""
    import shutil

    shutil.copytree(ROOT / "transposable", tmp_path / "transposable", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    masks = tmp_path / "transposable" / "masks.py"
    masks.write_text(masks.read_text() + "\n\ndef planted():\n" + "".join(f"    {line}\n" for line in
                                                                        planted.splitlines()))
    assert not check(ROOT)
    assert any("masks.py" in line for line in check(tmp_path)), check(tmp_path)
