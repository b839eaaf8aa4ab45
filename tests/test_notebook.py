"""The fine-tuning notebook runs top to bottom (as a user would run it in Jupyter)."""

import pytest

from .conftest import REPO


def test_finetune_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "finetune_mft.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "\n".join(
        output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )
    assert "Multi-task dataset: 4 tasks" in outputs  # the data summary
    assert "code_completion" in outputs  # per-task evaluation
    assert "<s>human\nAnd in JavaScript?\n<s>bot\n" in outputs  # the follow-up prompt carries the history
    assert any(output.get("data", {}).get("image/png") for cell in notebook.cells for output in cell.get("outputs", []))
