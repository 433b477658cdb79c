"""The notebooks run top to bottom in a fresh Jupyter kernel, offline, and are committed
with their outputs."""
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["mask_diversity.ipynb"])
def test_notebook_runs_from_a_fresh_kernel(name, tmp_path):
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    shutil.copytree(NOTEBOOKS.parent / "examples", tmp_path / "examples")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()  # raises on any cell error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the bar plot and the scatter
    text = "".join(o.get("text", "") for o in outputs)
    assert "4:8 transposable, counted exactly:      1.17e+11  -> fewer than 2:4 row-wise" in text
    assert "4:8 transposable, by the paper's formula: 1.76e+13  -> more than 2:4 row-wise" in text
    rho = float(re.search(r"Spearman rank correlation between log10 MD and kept L1: (-?[\d.]+)", text).group(1))
    assert rho > 0.9  # (b): more diversity keeps more magnitude on the trained layer


def test_committed_notebook_has_its_outputs():
    notebook = nbformat.read(NOTEBOOKS / "mask_diversity.ipynb", as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)
    assert sum(bool(cell.outputs) for cell in code_cells) >= 4
