"""The drift reference: what the validation images looked like, stored in the model artifact.

A nightly archive has no labels, so drift is judged by comparing tonight's inputs and outputs with
the validation images the model's figures come from (medclf.monitor.drift). Training fits this record at
the end (`fit_reference`, beside the out-of-scope guard's domain record):

  * per-image input statistics (`image_stats`, the ONE rule: scoring computes the same numbers in
    its decode stage, medclf.imaging.stage): intensity mean, sd, 5th/50th/95th percentile of the decoded
    image in [0, 1] before resizing and normalisation, height, width and aspect (width / height);
  * the format mix (png/jpeg/dicom) and the DICOM modality mix (`none` for JPEG/PNG);
  * the calibrated class probabilities and the true labels (the score distribution per class),
    the predicted-positive rate at the stored threshold and the prevalence;
  * the ood_score of each validation image when the model has a domain record: out-of-fold scores
    (in-sample ones would look falsely familiar), over `medclf.monitor.ood.OUT_OF_FOLD_FOLDS` folds;
  * the first `EMB_PCS` principal components of the penultimate-layer features: the basis and the
    validation images' projections (at most `MAX_ROWS`, a seeded sample).

The small fields go into model.json (`card.reference`, a `ReferenceRecord`), the arrays into
`reference.npz`, whose sha256 the card records like domain.npz's.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from medclf.data.predictions import EMB_PCS
from medclf.imaging.stats import STAT_COLUMNS, image_stats
from medclf.model.artifact import ArtifactFiles, ModelCard, ModelError
from medclf.model.networks import class_probabilities
from medclf.model.records import REFERENCE_FILE, ReferenceRecord  # noqa: F401 (REFERENCE_FILE: read here by callers)

log = logging.getLogger(__name__)

MAX_ROWS = 2000


@dataclass
class Reference:
    """The record and its arrays: one per STAT_COLUMNS name, `probs` (n, classes), `labels`,
    `ood_scores` (may be empty), `emb_center`, `emb_basis` (features x EMB_PCS), `emb` (projections)."""

    record: ReferenceRecord
    arrays: dict

    def project(self, features: np.ndarray) -> np.ndarray:
        """Penultimate features (n, d) -> their first principal components (n, EMB_PCS), NaN-padded."""
        z = (np.asarray(features, np.float64) - self.arrays["emb_center"]) @ self.arrays["emb_basis"]
        out = np.full((len(z), EMB_PCS), np.nan)
        out[:, :z.shape[1]] = z
        return out

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.arrays)
        return buf.getvalue()


# ood_score reference: out-of-fold, as the guard's threshold (medclf.monitor.ood.OUT_OF_FOLD_FOLDS). On
# phantoms 2 folds put the same-distribution ood_score 20% below new images and every
# same-distribution batch flagged; 10 folds came within 2%.


def fit_reference(card: ModelCard, embedding, val_y: np.ndarray, val_paths: list[str],
                  domain=None, seed: int = 0) -> Reference:
    """The drift reference of a trained model from its validation images: their `embedding`
    (medclf.monitor.ood.embed: features and logits), labels `val_y`, and the files (decoded again here, for
    the input statistics as scoring measures them). `domain`: the model's domain record
    (medclf.monitor.ood), for the reference ood scores; None: none."""
    import torch

    from medclf.monitor.ood import KNN_K, out_of_fold_scores

    if len(val_y) < EMB_PCS + 1:
        raise ModelError(f"the drift reference needs at least {EMB_PCS + 1} validation images, got {len(val_y)}")
    features, logits = embedding.features, embedding.logits
    probs = class_probabilities(torch.from_numpy(logits), card.temperature).numpy()
    if domain is None:
        ood_scores = None
    elif domain.record.n_fit == len(val_y) and len(domain.arrays.get("validation_scores", ())) == len(val_y):
        ood_scores = domain.arrays["validation_scores"]  # training: the same images, folds drawn by patient
    else:
        ood_scores = out_of_fold_scores(domain.record.score, features, logits, np.asarray(val_y),
                                        domain.record.pca_dim, seed, k=domain.record.k or KNN_K)
    facts = [_file_stats(p) for p in val_paths]
    arrays = {name: np.array([f["stats"][name] for f in facts]) for name in STAT_COLUMNS}
    center = features.mean(axis=0).astype(np.float64)
    _, sing, vt = np.linalg.svd(features - center, full_matrices=False)
    k = min(EMB_PCS, vt.shape[0])
    basis = vt[:k].T
    keep = np.sort(np.random.default_rng(seed).permutation(len(features))[:MAX_ROWS])
    arrays.update(probs=probs.astype(np.float32), labels=np.asarray(val_y, np.int64), emb_center=center,
                  emb_basis=basis, emb=(features[keep] - center) @ basis,
                  ood_scores=np.zeros(0) if ood_scores is None else np.asarray(ood_scores, np.float64))
    pos = card.positive_index
    variance = sing ** 2 / max(float((sing ** 2).sum()), 1e-12)
    record = ReferenceRecord(
        n=len(val_y), positive_class=card.positive_class,
        prevalence=None if pos is None else float((np.asarray(val_y) == pos).mean()),
        predicted_positive_rate=None if pos is None or card.threshold is None
        else float((probs[:, pos] >= card.threshold).mean()),
        format_mix=_counts(f["format"] for f in facts), modality_mix=_counts(f["modality"] for f in facts),
        has_ood_scores=ood_scores is not None, emb_pcs=k,
        emb_variance_explained=[float(v) for v in variance[:k]], n_emb=len(keep))
    log.info("drift reference: %d validation images, %d embedding components (%.0f%% of variance)",
             record.n, k, 100 * sum(record.emb_variance_explained))
    return Reference(record, arrays)


def _file_stats(path: str) -> dict:
    """A validation file decoded as scoring decodes it (one image: the middle frame)."""
    from medclf import storage
    from medclf.imaging.decode import open_images

    images = open_images(storage.read_bytes(path), path, "middle")
    frame = images.frames[0]
    return {"stats": image_stats(images.image(frame).image), "format": images.meta.get("format") or "unknown",
            "modality": images.meta.get("modality") or "none"}


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def add_reference(artifact: str, dest: str, paths: list[str], labels: list[str], seed: int = 0) -> Reference:
    """A copy of `artifact` at `dest` with a drift reference measured on these labelled images
    (same weights, same model id): for models trained before the reference existed, or to measure
    it on a larger labelled set than the validation split. Uses the domain record's ood scores
    (out-of-fold scores of these images) when the artifact has one; its other files are kept."""
    from medclf import storage
    from medclf.imaging.decode import decode
    from medclf.model.artifact import read_artifact, republish_with_files
    from medclf.monitor.ood import domain_of, embed, in_batches
    from medclf.imaging.preprocess import preprocess_gray

    files = read_artifact(artifact)
    model, card = files.network(), files.card
    x = np.stack([preprocess_gray(decode(storage.read_bytes(p), p).image, card.preprocess_spec) for p in paths])
    y = np.array([card.classes.index(label) for label in labels])
    reference = fit_reference(card, embed(model, card.arch, in_batches(x), len(x)), y, paths,
                              domain_of(files), seed)
    card.reference = reference.record.model_dump()
    republish_with_files(artifact, dest, card, {reference.record.file: reference.to_bytes()})
    return reference


def reference_of(artifact: ArtifactFiles) -> Optional[Reference]:
    """The artifact's drift reference with its arrays; None for artifacts from before drift reports."""
    if artifact.card.reference is None:
        return None
    record = ReferenceRecord.model_validate(artifact.card.reference)
    needed = [*STAT_COLUMNS, "probs", "labels", "emb_center", "emb_basis", "emb", "ood_scores"]
    return Reference(record, artifact.arrays(record.file, needed))
