"""Synthetic chest-radiograph phantoms: a labelled dataset that anyone can regenerate.

Layout is the one real datasets use: `<root>/<split>/<CLASS>/<patient>_<k>.<png|dcm>`, plus
`<root>/manifest.parquet` (path relative to root, label, split, patient_id, format and the
planted lesion's centre/size, which Grad-CAM checks use).

The signal is learnable but not trivial: two dark lung fields in a brighter body, ribs,
vessel dots and noise in every image; POSITIVE images also carry one or two soft opacities
inside a lung field, of varying size and contrast. Each patient has 1-3 images sharing one
anatomy, so a split that leaks patients is measurably optimistic. Everything is a function of
(seed, image index): the same seed gives byte-identical files.

PNG stores 8-bit values u; DICOM stores u*16 as 12-bit data with RescaleIntercept -1024 and a
window that maps back to u/255 exactly, so both formats decode to the same pixels.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

CLASSES = ("NORMAL", "POSITIVE")
PATIENT_REGEX = r"^(P\d+)_"
DICOM_INTERCEPT = -1024.0
DICOM_SCALE = 16  # stored = u * 16: 12-bit data (0..4080)


@dataclass
class Phantom:
    image: np.ndarray  # float32 HxW in [0, 1], already quantised to u/255
    lesions: list  # [(cx, cy, sigma)] in pixels; empty for NORMAL


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def render(anatomy_rng: np.random.Generator, image_rng: np.random.Generator, size: int, positive: bool) -> Phantom:
    """One phantom. `anatomy_rng` fixes the patient's geometry, `image_rng` this acquisition."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Patient anatomy (same for every image of the patient).
    body_rx, body_ry = s * anatomy_rng.uniform(0.40, 0.47), s * anatomy_rng.uniform(0.42, 0.48)
    lung_rx, lung_ry = s * anatomy_rng.uniform(0.13, 0.17), s * anatomy_rng.uniform(0.25, 0.32)
    lung_dx = s * anatomy_rng.uniform(0.17, 0.21)
    lung_cy = s * anatomy_rng.uniform(0.46, 0.54)
    tissue = anatomy_rng.uniform(0.55, 0.70)
    lung_level = anatomy_rng.uniform(0.18, 0.30)

    # Acquisition: small shifts, exposure and noise vary per image.
    cx = s / 2 + image_rng.normal(0, s * 0.02)
    cy = s / 2 + image_rng.normal(0, s * 0.02)
    img = np.full((size, size), 0.04, np.float32)
    img[_ellipse(yy, xx, cy, cx, body_ry, body_rx)] = tissue
    lungs = []
    for side in (-1, 1):
        lcx, lcy = cx + side * lung_dx, cy + (lung_cy - s / 2)
        mask = _ellipse(yy, xx, lcy, lcx, lung_ry, lung_rx)
        img[mask] = lung_level
        lungs.append((lcx, lcy, mask))
    # Ribs: faint bright bands across the lung fields.
    ribs = 0.06 * (np.sin(yy * (2 * np.pi / (s * image_rng.uniform(0.09, 0.12))) + image_rng.uniform(0, 6.3)) > 0.6)
    lung_mask = lungs[0][2] | lungs[1][2]
    img += ribs * lung_mask
    # Vessel dots in both classes: small bright spots the model must not mistake for disease.
    for _ in range(image_rng.integers(3, 8)):
        lcx, lcy, _ = lungs[image_rng.integers(0, 2)]
        vx, vy = lcx + image_rng.normal(0, lung_rx * 0.5), lcy + image_rng.normal(0, lung_ry * 0.5)
        img += 0.12 * np.exp(-((xx - vx) ** 2 + (yy - vy) ** 2) / (2 * (s * 0.012) ** 2))
    lesions = []
    if positive:
        for _ in range(image_rng.integers(1, 3)):
            lcx, lcy, _ = lungs[image_rng.integers(0, 2)]
            lx = lcx + image_rng.uniform(-0.5, 0.5) * lung_rx
            ly = lcy + image_rng.uniform(-0.6, 0.6) * lung_ry
            sigma = s * image_rng.uniform(0.04, 0.08)
            amp = image_rng.uniform(0.14, 0.30)
            img += amp * np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * sigma**2)) * lung_mask
            lesions.append((float(lx), float(ly), float(sigma)))
    # Smooth exposure gradient + noise; then a global contrast change.
    img += image_rng.uniform(-0.05, 0.05) * (xx / s - 0.5) + image_rng.uniform(-0.05, 0.05) * (yy / s - 0.5)
    img += image_rng.normal(0, 0.03, img.shape).astype(np.float32)
    img = np.clip(img, 0, 1) ** image_rng.uniform(0.85, 1.15)
    u = np.round(np.clip(img, 0, 1) * 255.0)
    return Phantom((u / 255.0).astype(np.float32), lesions)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(image: np.ndarray, patient_id: str, index: int, seed: int, modality: str = "DX") -> bytes:
    """A real DICOM Part-10 file: 12-bit MONOCHROME2 with rescale and window set."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    uid = lambda *parts: generate_uid(entropy_srcs=[str(seed), *map(str, parts)])  # noqa: E731 (deterministic UIDs)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid("sop", index)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study", patient_id)
    ds.SeriesInstanceUID = uid("series", patient_id, index)
    ds.Modality = modality
    # Synthetic identifying data: present on purpose, so tests can prove it never leaks.
    ds.PatientName = f"PHANTOM^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = f"19{50 + int(patient_id[1:]) % 50:02d}0101"
    ds.StudyDate = "20260101"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = DICOM_INTERCEPT
    # LINEAR window over the full stored range: decodes to exactly u/255 (see module doc).
    lo, hi = DICOM_INTERCEPT, DICOM_INTERCEPT + 255 * DICOM_SCALE
    ds.WindowCenter = (lo + hi) / 2 + 0.5
    ds.WindowWidth = hi - lo + 1
    ds.PixelData = (np.round(image * 255).astype(np.uint16) * DICOM_SCALE).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def generate(
    root: str,
    n_train: int = 400,
    n_test: int = 200,
    image_size: int = 64,
    positive_fraction: float = 0.5,
    formats: tuple[str, ...] = ("png", "dcm"),
    seed: int = 0,
) -> pd.DataFrame:
    """Write the dataset under `root` (local folder) and return the manifest."""
    rows = []
    index = 0
    patient = 0
    for split, n in (("train", n_train), ("test", n_test)):
        made = 0
        while made < n:
            patient_id = f"P{patient:05d}"
            prng = np.random.default_rng([seed, 1, patient])
            positive = bool(prng.random() < positive_fraction)
            label = CLASSES[1] if positive else CLASSES[0]
            anatomy_seed = int(prng.integers(2**31))
            for k in range(int(min(prng.integers(1, 4), n - made))):
                phantom = render(
                    np.random.default_rng(anatomy_seed), np.random.default_rng([seed, 2, index]), image_size, positive
                )
                lesion = max(phantom.lesions, key=lambda les: les[2]) if phantom.lesions else (np.nan,) * 3
                for fmt in formats:
                    rel = f"{split}/{label}/{patient_id}_{k}.{fmt}"
                    data = png_bytes(phantom.image) if fmt == "png" else dicom_bytes(phantom.image, patient_id, index, seed)
                    path = os.path.join(root, rel)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data)
                    rows.append(
                        dict(
                            path=rel, label=label, split=split, patient_id=patient_id, format=fmt, image_index=index,
                            lesion_x=lesion[0], lesion_y=lesion[1], lesion_sigma=lesion[2],
                            n_lesions=len(phantom.lesions),
                            lesions=json.dumps([[round(v, 3) for v in les] for les in phantom.lesions]),
                        )
                    )
                index += 1
                made += 1
            patient += 1
    manifest = pd.DataFrame(rows)
    manifest.to_parquet(os.path.join(root, "manifest.parquet"), index=False)
    return manifest


def render_ct_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """An axial-CT-like slice (what a chest-film model should not be shown): a round body in a dark
    field, two dark lungs, a bright vertebra and aorta, soft-tissue noise. Float HxW in [0, 1], u/255."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = s / 2 + rng.normal(0, s * 0.02), s / 2 + rng.normal(0, s * 0.02)
    img = np.zeros((size, size), np.float32)
    img[_ellipse(yy, xx, cy, cx, s * rng.uniform(0.30, 0.36), s * rng.uniform(0.42, 0.47))] = rng.uniform(0.45, 0.55)
    for side in (-1, 1):
        img[_ellipse(yy, xx, cy - s * 0.02, cx + side * s * 0.2, s * 0.2, s * 0.13)] = rng.uniform(0.02, 0.08)
    img[_ellipse(yy, xx, cy + s * 0.2, cx, s * 0.07, s * 0.07)] = rng.uniform(0.85, 0.95)  # vertebra
    img[_ellipse(yy, xx, cy + s * 0.05, cx + s * 0.05, s * 0.05, s * 0.05)] = rng.uniform(0.6, 0.7)  # aorta
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    return (np.round(np.clip(img, 0, 1) * 255.0) / 255.0).astype(np.float32)


def write_ct_like(folder: str, n: int, image_size: int = 64, seed: int = 0, fmt: str = "png") -> list[str]:
    """`n` CT-like slices as PNG, or as DICOM with Modality CT; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        image = render_ct_like(np.random.default_rng([seed, 3, i]), image_size)
        path = os.path.join(folder, f"ct{i:05d}.{fmt}")
        with open(path, "wb") as f:
            f.write(png_bytes(image) if fmt == "png" else dicom_bytes(image, f"P{i:05d}", i, seed, modality="CT"))
        paths.append(path)
    return paths


def write_shifted(paths: list[str], folder: str, gamma: float = 1.0, contrast: float = 1.0) -> list[str]:
    """PNG copies of images with a gamma (u -> u**gamma) and a contrast change about mid-grey: what a
    new detector or a changed processing preset does to every image of a night."""
    from medclf.imaging.decode import decode

    os.makedirs(folder, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            image = decode(f.read(), path).image
        image = np.clip((image ** gamma - 0.5) * contrast + 0.5, 0, 1)
        dest = os.path.join(folder, f"shifted{i:05d}.png")
        with open(dest, "wb") as f:
            f.write(png_bytes(image))
        out.append(dest)
    return out
