"""Grad-CAM: the maths on a model whose evidence is known, and localisation on phantoms."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from medclf.report.gradcam import grad_cam
from medclf.model.artifact import ModelError


class SpotModel(nn.Module):
    """logit[1] = max over space of a 1x1 conv: its only evidence is the brightest spot."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1)
        nn.init.constant_(self.features.weight, 1.0)
        nn.init.zeros_(self.features.bias)

    def forward(self, x):
        peak = self.features(x).amax(dim=(2, 3))
        return torch.cat([-peak, peak], 1)


def test_grad_cam_points_at_the_evidence():
    x = torch.zeros(2, 3, 16, 16)
    x[0, :, 3, 12] = 5.0
    x[1, :, 10, 2] = 5.0
    heat, probs, targets = grad_cam(SpotModel().eval(), x, "features", torch.tensor([1, 1]))
    assert heat.shape == (2, 16, 16) and heat.dtype == np.float32
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0.0
    assert np.unravel_index(heat[0].argmax(), (16, 16)) == (3, 12)
    assert np.unravel_index(heat[1].argmax(), (16, 16)) == (10, 2)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1.0) and list(targets) == [1, 1]
    _, _, decided = grad_cam(SpotModel().eval(), x, "features", lambda p: p.argmax(1))  # the decision
    assert list(decided) == [1, 1]
    with pytest.raises(ModelError, match="no layer 'layer9'"):
        grad_cam(SpotModel().eval(), x, "layer9", torch.tensor([1, 1]))


@pytest.fixture(scope="module")
def demo_model(ray_cluster, tmp_path_factory):
    """The demo recipe (configs/demo.yaml: small CNN, 64 px phantoms) trained with Ray Train."""
    from medclf.config import load_config
    from medclf.data.phantoms import generate
    from medclf.train.driver import run_training

    root = tmp_path_factory.mktemp("demo")
    data = str(root / "data")
    generate(data, n_train=480, n_test=120, image_size=64, formats=("png",), seed=3)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml"),
                      [f"data.root={data}", f"run.root={root}", "evaluate.bootstrap_resamples=0"])
    return run_training(cfg, str(root / "run")), data


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_grad_cam_peak_falls_in_the_planted_opacity(demo_model, tmp_path):
    from medclf.report.gradcam import run_explain

    trained, data = demo_model
    manifest = pd.read_parquet(os.path.join(data, "manifest.parquet"))
    positives = manifest[(manifest.split == "test") & (manifest.label == "POSITIVE")]
    paths = [os.path.join(data, p) for p in positives.path]
    out = str(tmp_path / "cam")
    index = run_explain(paths, trained.model_path, out, target="POSITIVE", cpus_per_actor=1)
    assert len(index) == len(paths) and (index.status == "ok").all()

    size = 64
    lesions_of = dict(zip(paths, positives.lesions))
    inside = []
    for row in index.itertuples():
        px, py = row.peak_x * size, row.peak_y * size
        # inside an opacity: within two standard deviations of a planted lesion's centre
        inside.append(any(np.hypot(px - lx, py - ly) <= 2 * s for lx, ly, s in json.loads(lesions_of[row.path])))
    fraction = float(np.mean(inside))
    print(f"Grad-CAM peak inside the planted opacity: {fraction:.3f} of {len(inside)} positive test images")
    assert fraction >= 0.8

    first = index.iloc[0]
    heat = np.load(first.heatmap_npy)
    assert heat.shape == (size, size) and 0.0 <= heat.min() and heat.max() == pytest.approx(1.0)
    with open(first.heatmap_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert pd.read_parquet(os.path.join(out, "explanations.parquet")).shape[0] == len(paths)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_score_explains_flagged_files_and_bad_files_are_rows(demo_model, tmp_path, capsys):
    from medclf.cli import main

    trained, data = demo_model
    src = tmp_path / "in"
    src.mkdir()
    manifest = pd.read_parquet(os.path.join(data, "manifest.parquet"))
    test = manifest[manifest.split == "test"].head(12)
    for p in test.path:
        os.symlink(os.path.join(data, p), src / os.path.basename(p))
    (src / "broken.png").write_bytes(b"not a png")
    rc = main(["score", "--config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml"),
               "--input", str(src), "--model", trained.model_path, "--run-root", str(tmp_path / "runs"),
               "--run-id", "s1", "--set", "score.explain_flagged=true", "--set", "score.cpus_per_actor=0.5",
               # the links point outside the input folder: reading there is allowed explicitly (medclf.imaging.confine)
               "--set", f"score.allowed_roots=[{src}, {data}]"])
    assert rc == 0
    pred = pd.read_parquet(tmp_path / "runs" / "s1" / "predictions")
    flagged = set(pred.loc[pred.predicted_label == "POSITIVE", "path"])
    index = pd.read_parquet(tmp_path / "runs" / "s1" / "explanations" / "explanations.parquet")
    assert flagged and set(index.path) == flagged and (index.target_class == "POSITIVE").all()
    assert "broken.png" not in " ".join(index.path)

    # explain a broken file directly: a row with its error, the others go on
    rc = main(["explain", "--config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml"),
               "--input", str(src), "--model", trained.model_path, "--run-root", str(tmp_path / "runs"),
               "--run-id", "e1", "--layer", "features.3"])
    assert rc == 0
    index = pd.read_parquet(tmp_path / "runs" / "e1" / "explanations" / "explanations.parquet")
    broken = index[index.path.str.endswith("broken.png")].iloc[0]
    assert broken.status == "error" and "broken.png" in broken.error
    assert (index[index.status == "ok"].layer == "features.3").all() and (index.status == "ok").sum() == 12
    rc = main(["explain", "--input", str(src), "--model", trained.model_path, "--layer", "nope",
               "--run-root", str(tmp_path / "runs")])
    assert rc == 2 and "no layer 'nope'" in capsys.readouterr().err
