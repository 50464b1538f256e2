"""examples/walkthrough.ipynb runs top to bottom in the project's environment; a failing cell fails the test."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "examples", "walkthrough.ipynb")


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_walkthrough_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel runs this interpreter (the project's environment) in the repository root, and
    # starts its own local Ray, as a reader's would.
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "model id:" in text and "second run: 0 scored" in text and "accuracy" in text
    night3 = next(line for line in text.splitlines() if line.startswith("night-3 flags:"))
    assert "img_mean" in night3  # the brightened night flags its intensity statistics
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # sample images, curves, ROC, confusion, gallery, Grad-CAM, drift histograms
