"""Every notebook in notebooks/ runs top to bottom without an error, and is committed without outputs.

Executed with nbclient on the `python3` kernel of this interpreter (ipykernel, dev extra). Marked
`notebooks` so a quick local run can deselect them (`pytest -m "not notebooks"`); CI runs them.
Each notebook writes only into its own temporary folder (`VSI_WORK_DIR`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # one cell; the slowest (generator training in 01) takes about two minutes on 2 cores


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_bring_your_own_data.ipynb",
                                           "03_reading_a_run.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # the kernel inherits this environment: scratch files in tmp_path, one thread like the rest of the suite
    monkeypatch.setenv("VSI_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MKL_NUM_THREADS", os.environ.get("MKL_NUM_THREADS", "1"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("VSI_RUN_DIR", raising=False)  # 03 must make its own run here
    if path.stem == "01_quickstart" and importlib.util.find_spec("elpv_dataset") is None:
        pytest.skip("01_quickstart needs the ELPV data: make setup (or pip install elpv-dataset)")
    nb = nbformat.read(path, as_version=4)
    # kernel "python3": jupyter_client starts it with this interpreter (sys.executable), so the kernel
    # sees the same environment and vision_si as the tests
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{str(exc)[-4000:]}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
