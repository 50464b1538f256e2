"""How often does a trained model refuse what it should, and refuse what it should not? (issue 33)

For one model artifact and its run's splits.parquet, every image goes through the scoring rules
in order: the header gate (modality, size, and the DICOM view / body-part rules of `--config`),
the content checks (medclf.imaging.content), then a feature-space detector. Three published
detectors are compared on the same images and the same penultimate features:

  * mahalanobis: min Mahalanobis distance to the class means, shared Ledoit-Wolf covariance
    (Lee et al. 2018);
  * knn: distance to the k-th nearest reference feature after L2 normalisation (Sun et al. 2022, k=10;
    medclf.monitor.ood's default);
  * energy: -logsumexp of the logits (Liu et al. 2020);
  * disagreement (ensembles only): the mutual information between the members' calibrated predictions,
    H(mean_m p_m) - mean_m H(p_m) (Lakshminarayanan et al. 2017; Depeweg et al. 2018). It fits nothing but
    its threshold (the `--quantile` of the fit part's scores) and has no stored record.

The threshold must carry across parts of the archive, so it is never judged on the part it was
fitted on: with the family-held-out validation of the run (val_group `family` and `patient`),
each detector is fitted on one part as training fits it (medclf.monitor.ood: reference features, and
the threshold = the `--quantile` of that part's out-of-fold scores, folds by patient) and applied to
the other part, both ways. `stored` rows: the model's own domain record, as scoring applies it.
False refusals are measured on the other part; refusals on every out-of-domain set.

Sets (every figure with its 95% Wilson interval):
  chest films: the validation parts of the run (in-domain: refusals are false refusals);
  shifted: the patient part under each acquisition shift of medclf.data.augment (valid films: reported);
  lung_ct, breast_us: samples of ../shared/data/{lung_ct,breast_us};
  dicom_other: pydicom / pydicom-data DICOM that are not CR/DX (CT, MR, US, ...);
  blank_grey, noise, blurred_noise, photographs (Pillow scenes), phantoms (medclf.data.phantoms).

    MEDCLF_UID_KEY=x PYTHONPATH=. python benchmarks/ood_refusal.py --model runs/<id>/model \\
        --splits runs/<id>/splits.parquet --config configs/pneumonia_xray.yaml [--shared ../shared] [--n 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from medclf.config import load_config
from medclf.data.augment import ACQUISITION_SHIFTS, acquisition_shift
from medclf.data.phantoms import render
from medclf.imaging.decode import open_images
from medclf.imaging.preprocess import preprocess_gray, to_model_input
from medclf.model.artifact import load_artifact
from medclf.imaging.content import content_reason
from medclf.monitor.drift import wilson
from medclf.data.labelled import patient_id_of
from medclf.imaging.appearance import STAT_NAMES, _distance, appearance_stats, fit_appearance
from medclf.monitor.ood import KNN_K, _score, features_and_logits, fit_reference, in_batches, out_of_fold_scores
from medclf.model.records import input_gate
from medclf.imaging.scope import input_out_of_scope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- detectors


class Detector:
    """A detector fitted as medclf.monitor.ood.fit_domain fits it: the reference on these features,
    the threshold = the quantile of out-of-fold scores, folds by patient when `groups` are given."""

    def __init__(self, kind: str, f, logits, y, quantile: float, groups=None):
        self.kind, self.k = kind, KNN_K
        self.arrays = fit_reference(kind, f, y)
        held = out_of_fold_scores(kind, f, logits, y, groups=groups, k=KNN_K)
        self.threshold = float(np.quantile(held, quantile))

    def scores(self, s: dict) -> np.ndarray:
        return _score(self.kind, self.arrays, s["f"], s["logits"], self.k)


class Disagreement:
    """The members' mutual information; the threshold = the quantile of the fit part's scores."""

    kind = "disagreement"

    def __init__(self, member_probs: np.ndarray, quantile: float):
        self.threshold = float(np.quantile(mutual_information(member_probs), quantile))

    def scores(self, s: dict) -> np.ndarray:
        return mutual_information(s["member_probs"])


def mutual_information(member_probs: np.ndarray) -> np.ndarray:
    """(N, M members, C classes) calibrated probabilities -> (N,) H(mean) - mean H, in nats."""
    def entropy(p):
        return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=-1)

    return entropy(member_probs.mean(axis=1)) - entropy(member_probs).mean(axis=1)


# ---------------------------------------------------------------- images


def photographs(n: int, seed: int = 0) -> list[np.ndarray]:
    """Synthetic coloured scenes: a gradient sky, shapes, text; as the decoder would give them (grey, [0, 1])."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(320, 800)), int(rng.integers(240, 600))
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        img = Image.fromarray(((1 - t) * top + t * bottom).repeat(w, axis=1).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 12))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            [draw.ellipse, draw.rectangle][int(rng.integers(0, 2))](box, fill=colour)
        draw.text((int(rng.integers(0, w // 2)), int(rng.integers(0, h - 20))), f"holiday {i}", fill=(255, 255, 255))
        out.append(np.asarray(img.convert("L"), np.float32) / 255.0)
    return out


def synthetic_sets(n: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    from scipy.ndimage import gaussian_filter

    return {
        "blank_grey": [np.zeros((512, 512), np.float32) if i % 2 else np.full((512, 512), rng.uniform(0.1, 0.9), np.float32)
                       for i in range(n)],
        "noise": [rng.uniform(0, 1, (512, 512)).astype(np.float32) for _ in range(n)],
        "blurred_noise": [np.clip(0.5 + 3 * (gaussian_filter(rng.uniform(0, 1, (512, 512)), 8) - 0.5), 0, 1)
                          .astype(np.float32) for _ in range(n)],
        "photographs": photographs(n),
        "phantoms": [render(np.random.default_rng(i), np.random.default_rng(1000 + i), 224, i % 2 == 1).image
                     for i in range(n)],
    }


def files_under(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                  if f.lower().endswith((".jpeg", ".jpg", ".png")))


def other_dicom() -> list[str]:
    from pydicom.data import get_testdata_files

    return sorted(p for p in get_testdata_files() if os.path.isfile(p) and p.endswith(".dcm"))


def load(path: str, gate: dict):
    """(stage reason or None, decoded image or None): the header gate and the content checks, as scoring."""
    try:
        with open(path, "rb") as f:
            images = open_images(f.read(), path, "middle")
        reason = input_out_of_scope(images.meta, gate)
        image = images.image(images.frames[0]).image
    except Exception:
        return "undecodable", None
    return reason or content_reason(image), image


# ---------------------------------------------------------------- main


def embed_images(model, card, images: list) -> dict:
    spec = card.preprocess_spec
    x = np.stack([preprocess_gray(im, spec) for im in images]) if images else np.zeros((0, 1, spec.image_size,
                                                                                        spec.image_size), np.float32)
    return embed_x(model, card, x)


def embed_x(model, card, x: np.ndarray) -> dict:
    """x, features, logits and (an ensemble) the members' calibrated probabilities (N, M, C), one pass."""
    members = len(getattr(model, "members", []))
    if not len(x):
        return {"x": x, "f": np.zeros((0, 1)), "logits": np.zeros((0, 2)),
                "member_probs": np.zeros((0, members, len(card.classes)))}
    if not members:
        f, logits = features_and_logits(model, card.arch, x, batch=32)
        return {"x": x, "f": f, "logits": logits, "member_probs": np.zeros((len(x), 0, len(card.classes)))}
    out: list[list] = [[], [], []]
    model.eval()
    with torch.inference_mode():
        for _, batch in in_batches(x, 32):
            results = model.logits_features_and_member_probs(to_model_input(torch.from_numpy(batch)))
            for kept, result in zip(out, results):
                kept.append(result.float().numpy())
    logits, f, member_probs = (np.concatenate(kept) for kept in out)
    return {"x": x, "f": f, "logits": logits, "member_probs": member_probs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--splits", help="the run's splits.parquet (validation parts); default: none (no chest sets)")
    p.add_argument("--config", help="config whose data.views/body_parts the header gate applies")
    p.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    p.add_argument("--n", type=int, default=200, help="images per out-of-domain set")
    p.add_argument("--max-val", type=int, default=0, help="at most this many films per validation part (0: all)")
    p.add_argument("--max-shifted", type=int, default=100, help="patient-part films per acquisition shift")
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--chest-sample", type=int, default=0,
                   help="no splits: score this many Kermany films as one out-of-domain set (demo model)")
    p.add_argument("--appearance", type=int, default=1,
                   help="1: the pixel-statistics check (medclf.imaging.appearance) refuses too, as scoring does")
    p.add_argument("--appearance-quantile", type=float, default=0.995)
    p.add_argument("--out", help="CSV of the results table")
    args = p.parse_args(argv)
    start = time.time()
    model, card = load_artifact(args.model)
    # A model without a domain record: the minimum side training would record (half the 224 px films)
    gate = input_gate(card) or {"modalities": [], "min_size": card.preprocess_spec.image_size // 2}
    gate["content"] = True
    if args.config:
        dc = load_config(args.config).data
        gate["header"] = {"views": dc.views, "body_parts": dc.body_parts, "lateralities": dc.lateralities,
                          "allow_missing": dc.allow_missing}
        gate["modalities"] = dc.modalities or gate["modalities"]
    print(f"model {card.model_id} ({card.arch}); gate {gate}", file=sys.stderr)
    rng = np.random.default_rng(0)
    data = os.path.join(args.shared, "data")

    sets: dict[str, dict] = {}  # name -> {"stage": [reason...], "x", "f", "logits", "y", "in_domain"}

    patient_regex = load_config(args.config).data.patient_regex if args.config else None

    def add_files(name, paths, in_domain, labels=None):
        reasons, images, y, groups = [], [], [], []
        undecodable = 0
        for i, path in enumerate(paths):
            reason, image = load(path, gate)
            if reason == "undecodable":  # scoring's error rows, not refusals: left out of n
                undecodable += 1
                continue
            reasons.append(reason)
            if reason is None:
                images.append(image)
                y.append(labels[i] if labels is not None else -1)
                groups.append(patient_id_of(path, patient_regex))
        sets[name] = {**embed_images(model, card, images), "stage": reasons, "y": np.array(y),
                      "in_domain": in_domain, "groups": groups}
        print(f"{name}: {len(paths)} files ({undecodable} undecodable), {time.time() - start:.0f}s", file=sys.stderr)

    if args.splits:
        splits = pd.read_parquet(args.splits)
        val = splits[splits.split == "val"]
        for part in ("family", "patient"):
            rows = val[val.val_group == part]
            if args.max_val and len(rows) > args.max_val:
                rows = rows.sample(args.max_val, random_state=0)
            # as recorded, or (a run from another checkout) the same <CLASS>/<file> under --shared
            paths = [q if os.path.exists(q) else os.path.join(data, "chest_xray", "train", *q.split("/")[-2:])
                     for q in rows.path]
            add_files(f"chest_{part}", paths, True, [card.classes.index(c) for c in rows.label])
    if args.chest_sample:
        chest = files_under(os.path.join(data, "chest_xray", "train"))
        add_files("chest_films", list(rng.choice(chest, min(args.chest_sample, len(chest)), replace=False)), False)
    for name, folder in (("lung_ct", "lung_ct"), ("breast_us", "breast_us")):
        paths = files_under(os.path.join(data, folder))
        add_files(name, list(rng.choice(paths, min(args.n, len(paths)), replace=False)), False)
    add_files("dicom_other", [q for q in other_dicom() if _modality(q) not in ("CR", "DX", None)], False)
    for name, images in synthetic_sets(max(10, args.n // 4)).items():
        reasons = [input_out_of_scope({"width": im.shape[1], "height": im.shape[0]}, gate) or content_reason(im)
                   for im in images]
        embedded = embed_images(model, card, [im for im, r in zip(images, reasons) if r is None])
        sets[name] = {**embedded, "stage": reasons, "y": np.full(len(embedded["x"]), -1), "in_domain": False}
    if "chest_patient" in sets:  # acquisition-shifted valid films (feature detector only: same pixels otherwise)
        spec = card.preprocess_spec
        base_x, base_y = sets["chest_patient"]["x"][:args.max_shifted], sets["chest_patient"]["y"][:args.max_shifted]
        for kind in ACQUISITION_SHIFTS:
            x = acquisition_shift(torch.from_numpy(base_x), kind, spec.mean, spec.std).numpy()
            sets[f"shifted: {kind}"] = {**embed_x(model, card, x), "stage": [None] * len(x), "y": base_y,
                                        "in_domain": True}
    print(f"embedded everything, {time.time() - start:.0f}s", file=sys.stderr)

    rows = []
    directions = ([("family", "patient"), ("patient", "family")] if args.splits else []) + [(None, None)]
    for s in sets.values():  # the pixel-statistics check (medclf.imaging.appearance) runs on the same pixels
        s["looks"] = np.array([appearance_stats(x) for x in s["x"]]).reshape(len(s["x"]), len(STAT_NAMES))
    stored_looks = (card.domain or {}).get("appearance")
    kinds = ("mahalanobis", "knn", "energy") + (("disagreement",) if getattr(model, "members", None) else ())
    for kind in kinds:
        for fit_part, test_part in directions:
            if fit_part:
                ref = sets[f"chest_{fit_part}"]
                det = (Disagreement(ref["member_probs"], args.quantile) if kind == "disagreement" else
                       Detector(kind, ref["f"], ref["logits"], ref["y"], args.quantile, ref["groups"]))
                looks = fit_appearance(ref["looks"], ref["groups"], args.appearance_quantile) if args.appearance else None
            else:
                det = _stored_detector(args.model, card, kind)
                looks = stored_looks if args.appearance else None
                if det is None:
                    continue
            for name, s in sets.items():
                if fit_part and name == f"chest_{fit_part}":
                    continue  # never judged on the part it was fitted on
                if not fit_part and args.splits and (name.startswith("chest_") or name.startswith("shifted")):
                    continue  # the stored record was fitted on all of validation
                if fit_part and name.startswith("shifted") and fit_part == "patient":
                    continue  # shifted copies of the fit part
                stage = np.array([r is not None for r in s["stage"]])
                feat = det.scores(s) > det.threshold if len(s["f"]) else np.zeros(0, bool)
                pixel = np.zeros(len(s["f"]), bool)
                if looks and len(s["f"]):
                    pixel = _distance(s["looks"], np.asarray(looks["mean"]),
                                      np.asarray(looks["precision"])) > looks["threshold"]
                n = len(stage)
                k_stage = int(stage.sum())
                k = k_stage + int((feat | pixel).sum())
                lo, hi = wilson(k, n) if n else (np.nan, np.nan)
                rows.append({"detector": kind, "fitted_on": fit_part or "stored", "set": name,
                             "in_domain": s["in_domain"], "n": n, "refused_by_header_or_content": k_stage,
                             "refused_by_pixel_stats": int(pixel.sum()), "refused_by_detector": int(feat.sum()),
                             "refused": k, "rate": k / n if n else np.nan, "ci_low": lo, "ci_high": hi,
                             "threshold": det.threshold})
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out:
        table.to_csv(args.out, index=False)
    print(f"{time.time() - start:.0f}s", file=sys.stderr)
    return 0


def _stored_detector(path, card, kind):
    """The model's own stored domain record: what scoring applies."""
    from medclf.monitor.opened import open_model

    domain = open_model(path, network=False).domain
    if domain is None or kind != domain.record.score:
        return None
    det = Detector.__new__(Detector)
    det.kind, det.arrays, det.threshold, det.k = kind, domain.arrays, domain.record.threshold, domain.record.k
    return det


def _modality(path: str):
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("Modality", "") or "") or None
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
