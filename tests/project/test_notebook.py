"""examples/walkthrough.ipynb: it runs top to bottom in the project's environment, from examples/ (where
Jupyter starts its kernel) and from the repository root; the copy in the repository is the builder's
code with the outputs of such a run saved, so a reader sees what it shows without running it."""

import glob
import importlib.util
import os
import shutil
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "examples", "walkthrough.ipynb")


def builder():
    spec = importlib.util.spec_from_file_location("build_walkthrough",
                                                  os.path.join(ROOT, "examples", "build_walkthrough.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_outputs(nb) -> None:
    """What a run of the walkthrough must show: no error, every step's output, and the drift story its
    text tells (the brightened night flags its intensity statistics)."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell without a run"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "model id:" in text and "second run: 0 scored" in text and "accuracy" in text
    night1 = next(line for line in text.splitlines() if line.startswith("night-1 flags:"))
    night3 = next(line for line in text.splitlines() if line.startswith("night-3 flags:"))
    assert "img_mean" in night3 and "img_mean" not in night1  # the text: only the brightened night shifts
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # sample images, curves, ROC, confusion, gallery, Grad-CAM, drift histograms


@pytest.fixture
def remove_walkthrough_folders():
    """The notebook keeps its working folder (a reader looks into it afterwards); a test run removes the
    ones it made, or every CI run leaves about 50 MB behind in the temp folder."""
    pattern = os.path.join(tempfile.gettempdir(), "medclf-walkthrough-*")
    before = set(glob.glob(pattern))
    yield
    for folder in set(glob.glob(pattern)) - before:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("start", ["examples", "root"])
def test_walkthrough_notebook_executes(start, remove_walkthrough_folders):
    pytest.importorskip("nbclient")
    build = builder()
    # The kernel runs this interpreter (the project's environment) and starts its own local Ray, as a
    # reader's would; Jupyter starts it in the notebook's folder, a script in the root.
    nb = build.execute(build.build(), build.HERE if start == "examples" else ROOT)
    check_outputs(nb)


def test_saved_notebook_is_the_builders_code_with_its_outputs():
    nbformat = pytest.importorskip("nbformat")
    saved = nbformat.read(NOTEBOOK, as_version=4)
    built = builder().build()
    assert [(c.cell_type, c.source) for c in saved.cells] == [(c.cell_type, c.source) for c in built.cells], \
        "examples/walkthrough.ipynb is stale: run `python examples/build_walkthrough.py --execute`"
    check_outputs(saved)
