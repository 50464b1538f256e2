import hashlib
import os

import numpy as np

from medclf.imaging.decode import decode
from medclf.data.phantoms import PATIENT_REGEX, generate
from medclf.data.labelled import patient_id_of


def digests(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate(str(tmp_path / "a"), n_train=10, n_test=4, image_size=32, seed=3)
    generate(str(tmp_path / "b"), n_train=10, n_test=4, image_size=32, seed=3)
    generate(str(tmp_path / "c"), n_train=10, n_test=4, image_size=32, seed=4)
    a, b, c = digests(tmp_path / "a"), digests(tmp_path / "b"), digests(tmp_path / "c")
    assert a == b
    assert len(a) == 2 * 14 + 1  # png + dcm per image, plus the manifest
    pngs = lambda d: {v for k, v in d.items() if k.endswith(".png")}  # noqa: E731
    assert not pngs(a) & pngs(c)  # another seed: no image in common


def test_layout_manifest_and_signal(tmp_path):
    m = generate(str(tmp_path), n_train=40, n_test=10, image_size=48, seed=1)
    assert set(m.columns) >= {"path", "label", "split", "patient_id", "lesion_x", "lesion_y"}
    assert m.groupby("split").image_index.nunique().to_dict() == {"test": 10, "train": 40}
    for row in m.itertuples():
        split, label, name = row.path.split("/")
        assert (split, label) == (row.split, row.label)
        assert patient_id_of(name, PATIENT_REGEX) == row.patient_id
        assert os.path.exists(tmp_path / row.path)
    # Each patient has one label and one split; positives carry a lesion, normals none.
    assert (m.groupby("patient_id")[["label", "split"]].nunique() == 1).all().all()
    assert (m[m.label == "POSITIVE"].n_lesions > 0).all() and (m[m.label == "NORMAL"].n_lesions == 0).all()
    # The opacity is brighter than the lung around it: the signal is really there.
    pos = m[(m.label == "POSITIVE") & (m.format == "png")].iloc[0]
    img = decode((tmp_path / pos.path).read_bytes(), pos.path).image
    y, x = int(round(pos.lesion_y)), int(round(pos.lesion_x))
    assert img[y, x] > np.median(img[img < 0.45])
