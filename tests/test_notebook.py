"""The scientist's quickstart notebook runs end to end: a real federation, search, refusals, training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"


def _text(outputs: list) -> str:
    """All the text a reader sees in a cell's outputs (streams, results, errors)."""
    parts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out.get("traceback", [])))
    return "\n".join(parts)


def test_quickstart_notebook_is_clean():
    """Committed without outputs, so diffs stay readable and nothing from a run leaks into git."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel must be this interpreter (the venv with voxgrid installed), not some other
    # python3 kernelspec: jupyter_client maps the "python" of the default spec to sys.executable.
    guard = nbformat.v4.new_code_cell(
        "import sys\n"
        f"assert sys.prefix == {sys.prefix!r}, f'notebook kernel runs {{sys.executable}}, not {sys.executable}'")
    nb.cells.insert(0, guard)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile.mkdtemp() lands here
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error

    texts = [_text(c.outputs) for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    everything = "\n".join(texts)
    # the pointer table (PointerList's repr) with the three sites
    assert any("node" in t and "dataset" in t and "volumes" in t and "node-site-a" in t for t in texts), everything
    for site in ("node-site-a", "node-site-b", "node-site-c"):
        assert site in everything
    # both refusals were shown
    assert "stay at node" in everything and "never release voxels" in everything
    assert "is not an allowed network" in everything
    # the Dice table, the picture of Dice per site over rounds, and the cross-site table
    assert "global model Dice" in everything
    svgs = [o["data"]["image/svg+xml"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.get("output_type") in ("display_data", "execute_result") and "image/svg+xml" in o.get("data", {})]
    assert len(svgs) == 1 and svgs[0].count('class="site"') == 3, svgs
    assert "Dice on each site's test split" in everything and "initial weights" in everything
    assert "mean test Dice: round 0" in everything
