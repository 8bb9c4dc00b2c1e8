"""docs/notebooks/learning_dynamics.ipynb top to bottom in a real Jupyter kernel, on a tiny run it builds."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "learning_dynamics.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    run = tmp_path / "tiny"
    monkeypatch.setenv("PICO_RUN", str(run))  # absent: the first cell trains a tiny run there
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    temp = tmp_path / "temp"  # where the kernel's tempfile writes the tokens it trains on
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK.parent}}
    ).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 3  # CKA (steps and layers), PER of gradients, OV circuit per head
    assert (run / "checkpoints" / "step_20" / "learning_dynamics" / "weights.safetensors").is_file()
    assert not list(temp.rglob("*.parquet"))  # the notebook removed the tokens once the run was trained
    tables = [out["data"]["text/plain"] for out in outputs if "text/plain" in out.get("data", {})]
    assert "perplexity" in tables[0] and "per" in tables[-1] and "norm_spectral" in tables[-1]
    assert any("next token" in table and "loss at 20" in table for table in tables)  # easier / harder tokens
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "of the eval tokens got easier" in text
    assert "step_15's train split stored the same rows: True" in text  # batch_at, decoded above it
