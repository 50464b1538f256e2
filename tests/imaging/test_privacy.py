"""File names and DICOM UIDs stay out of what people look at, unless a site turns them on (no Ray)."""

import os
import shutil

import numpy as np
import pandas as pd
import pytest

from medclf.imaging.privacy import PrivacyError, check_uid_policy, display_name, protect_uid

PATIENT = "DOE_JANE_MRN7734921"


def test_display_name_hides_the_file_name_by_default():
    path = f"/archive/2026/{PATIENT}_chest.png"
    hidden = display_name(path)
    assert PATIENT not in hidden and hidden == display_name(path) and hidden != display_name(path + "x")
    assert display_name(path, show_paths=True) == f"{PATIENT}_chest.png"


def test_uid_policy():
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert protect_uid(uid, "keep", None) == uid and protect_uid(uid, "drop", None) is None
    hashed = protect_uid(uid, "hash", "site-a")
    assert hashed != uid and hashed == protect_uid(uid, "hash", "site-a") != protect_uid(uid, "hash", "site-b")
    assert protect_uid(None, "hash", "site-a") is None
    with pytest.raises(PrivacyError, match="score.uids=hash needs the site's key: set MEDCLF_UID_KEY"):
        check_uid_policy("hash", None)


@pytest.fixture
def patient_named(phantom_root, tmp_path):
    src = next(os.path.join(phantom_root, "test", "POSITIVE", f)
               for f in sorted(os.listdir(os.path.join(phantom_root, "test", "POSITIVE"))) if f.endswith(".png"))
    dst = tmp_path / f"{PATIENT}_chest.png"
    shutil.copy(src, dst)
    return str(dst)


@pytest.mark.parametrize("show_paths", [False, True])
def test_gallery_captions(patient_named, monkeypatch, show_paths):
    import medclf.report.plots as plots
    from medclf.report.evaluate import gallery

    seen = {}
    monkeypatch.setattr(plots, "gallery_plot", lambda images, captions, wrong, title: seen.update(c=captions) or b"")
    ok = pd.DataFrame({"path": [patient_named]})
    gallery(ok, np.array([1]), np.array([1]), np.array([[0.2, 0.8]]), ["NORMAL", "POSITIVE"], show_paths)
    assert (PATIENT in seen["c"][0]) == show_paths
    assert display_name(patient_named)[:28] in seen["c"][0] or show_paths


@pytest.mark.parametrize("show_paths", [False, True])
def test_grad_cam_names_and_captions(patient_named, tmp_path, monkeypatch, show_paths):
    import medclf.report.gradcam as gradcam
    from medclf.model.artifact import ModelCard, save_artifact
    from medclf.model.networks import build_model
    from medclf.imaging.stage import load_images

    model_dir = str(tmp_path / "model")
    save_artifact(build_model("small_cnn", 2), ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"],
                                                         preprocess={"image_size": 32}), model_dir)
    captions = []
    real_overlay = gradcam.overlay_png
    monkeypatch.setattr(gradcam, "overlay_png", lambda g, h, caption: captions.append(caption) or real_overlay(g, h, caption))
    (batch,) = load_images({"path": np.array([patient_named])}, {"image_size": 32})  # one batch of one row
    rows = gradcam.Explainer(model_dir, str(tmp_path / "cam"), show_paths=show_paths)(batch)
    names = os.listdir(tmp_path / "cam" / "heatmaps")
    assert rows["status"] == ["ok"] and len(names) == 2
    assert all((PATIENT in n) == show_paths for n in names) and (PATIENT in captions[0]) == show_paths
