"""The out-of-scope guard: what a model was trained on, and whether an input is like it.

A chest-film model asked about a CT slice or a 1x1-pixel PNG still answers with a probability;
this module lets scoring say `status = out_of_scope` instead. Training fits a domain record on
the validation images (`fit_domain`) and stores it in the model artifact:

  * the DICOM modalities the model is for (`data.modalities`; training JPEG/PNGs carry none),
    and, for the record, the photometric interpretations, formats and image sizes seen;
  * the minimum image side: half the smallest validation image side (at least `ood.min_size_floor`);
  * input statistics of the preprocessed validation images (for the record and for audits);
  * a feature-space reference of the penultimate-layer features. `ood.score: knn` (the default;
    Sun et al. 2022): the validation features, L2-normalised, are the reference bank, and
    `ood_score` = the distance to the `ood.knn_k`-th nearest of them. `mahalanobis` (Lee et al.
    2018): class means with one shared Ledoit-Wolf shrinkage covariance, `ood_score` = the smallest
    Mahalanobis distance to a class mean, squared and divided by the feature dimension. kNN refused
    lung CT, breast US, photographs and phantoms at 100% with the fewest false refusals on held-out
    chest films, Mahalanobis missed 40% of phantoms (docs/ood.md). `energy` and `max_softmax` are
    kept for comparison.
  * the threshold: the `ood.quantile` quantile of out-of-fold validation scores: each tenth of
    validation is scored by the reference fitted on the other nine, folds drawn by patient
    (`data.patient_regex`), so an image is never judged against its own patient's other films,
    as a new archive's images will not be; the stored reference is then fitted on all of it. Ten
    folds, not two: a Gaussian fitted on half the images shrinks more and scores lower than the
    full fit that scores new images (phantoms: 11.5% of a same-distribution night over the 0.95
    quantile with 2 folds).

Scoring applies two kinds of rule. At decode time (medclf.imaging.scope, in the image stage; no model needed): a DICOM
modality not in the record, or an image smaller than the minimum side (`input_out_of_scope`).
After the forward pass (medclf.score.batch): `ood_score` above the threshold. Either way the row's
`error` says why; see docs/usage.md for what the row carries.

The small fields go into model.json (`card.domain`, a `DomainRecord`), the arrays into
`domain.npz` beside the weights; the card records its sha256 (medclf.model.artifact.read_artifact_file).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from medclf.model.artifact import ArtifactFiles, ModelError
from medclf.model.networks import penultimate
from medclf.model.records import DOMAIN_FILE, DomainRecord  # noqa: F401 (DOMAIN_FILE: read here by callers)
from medclf.imaging.scope import REASONS
from medclf.imaging.appearance import STAT_NAMES, appearance_stats, fit_appearance, fold_of
from medclf.imaging.preprocess import to_model_input

log = logging.getLogger(__name__)

SCORES = ("knn", "mahalanobis", "energy", "max_softmax")
ARRAYS = {"mahalanobis": ["center", "components", "means", "precision"], "knn": ["bank"]}
"""The reference arrays each feature-space score reads (besides `validation_scores`)."""



@dataclass
class Domain:
    """A domain record and its arrays: for Mahalanobis `center`, `components` (PCA; empty when none),
    class `means`, shared `precision`; for kNN the unit-length reference `bank`; and the
    out-of-fold `validation_scores` the threshold came from."""

    record: DomainRecord
    arrays: dict

    def scores(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """ood_score per image: higher = less like the validation images."""
        return _score(self.record.score, self.arrays, features, logits, self.record.k)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.arrays)
        return buf.getvalue()


# ---------------------------------------------------------------- scores


def _score(kind: str, arrays: dict, features: np.ndarray, logits: np.ndarray, k: Optional[int] = None) -> np.ndarray:
    if kind == "knn":
        return knn_distance(arrays["bank"], features, k or KNN_K)
    logits = np.asarray(logits, np.float64)
    if kind == "energy":  # Liu et al. 2020: -logsumexp of the logits; higher = less familiar
        top = logits.max(axis=1)
        return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))
    if kind == "max_softmax":
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return 1.0 - (p / p.sum(axis=1, keepdims=True)).max(axis=1)
    z = _project(arrays, features)
    best = np.full(len(z), np.inf)
    for mean in arrays["means"]:
        d = z - mean
        best = np.minimum(best, ((d @ arrays["precision"]) * d).sum(axis=1))
    return best / z.shape[1]


def _project(arrays: dict, features: np.ndarray) -> np.ndarray:
    z = np.asarray(features, np.float64) - arrays["center"]
    return z @ arrays["components"] if arrays["components"].size else z


KNN_K = 10
"""Default neighbour rank of the kNN score (`ood.knn_k`)."""


def unit_bank(features: np.ndarray) -> np.ndarray:
    """The kNN reference: features scaled to unit length (float32: near neighbours' distances are
    sqrt(2 - 2 cos), so float16 rounding alone would put 0.01 between an image and itself)."""
    f = np.asarray(features, np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def knn_distance(bank: np.ndarray, features: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance from each unit-length feature to its k-th nearest bank row (Sun et al. 2022)."""
    q = unit_bank(features)
    ref = np.asarray(bank, np.float32)
    k = max(1, min(k, len(ref)))
    out = np.empty(len(q))
    for i in range(0, len(q), chunk):  # bounded memory: chunk x bank similarities at a time
        sims = q[i:i + chunk] @ ref.T
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]  # k-th largest cosine similarity
        out[i:i + chunk] = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * kth))
    return out


def fit_reference(kind: str, features: np.ndarray, labels: np.ndarray, pca_dim: Optional[int] = None) -> dict:
    """The arrays a feature-space score needs, fitted on these features (empty for logit scores)."""
    if kind == "mahalanobis":
        return fit_gaussian(features, labels, pca_dim)
    if kind == "knn":
        return {"bank": unit_bank(features)}
    return {}


def fit_gaussian(features: np.ndarray, labels: np.ndarray, pca_dim: Optional[int] = None) -> dict:
    """Class means and one shared Ledoit-Wolf covariance (as its inverse) of the features."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, np.float64)
    center = features.mean(axis=0)
    components = np.zeros((0, 0))
    if pca_dim and pca_dim < min(features.shape):
        _, _, vt = np.linalg.svd(features - center, full_matrices=False)
        components = vt[:pca_dim].T
    arrays = {"center": center, "components": components}
    z = _project(arrays, features)
    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(axis=0) for c in classes])
    residuals = z - means[np.searchsorted(classes, labels)]
    covariance = LedoitWolf(assume_centered=True).fit(residuals).covariance_
    return {**arrays, "means": means, "precision": np.linalg.pinv(covariance, hermitian=True)}


OUT_OF_FOLD_FOLDS = 10
"""Folds of the out-of-fold validation scores (threshold and drift reference)."""


def out_of_fold_scores(kind: str, features: np.ndarray, logits: np.ndarray, labels: np.ndarray,
                       pca_dim: Optional[int] = None, seed: int = 0, folds: int = OUT_OF_FOLD_FOLDS,
                       groups: Optional[list] = None, k: int = KNN_K) -> np.ndarray:
    """Each validation image scored by a reference fitted on the other folds (at most one image
    per fold on tiny validation sets; a patient's images in one fold when `groups` names them).
    Fewer images to fit on means more shrinkage and smaller scores than new images get under the
    Gaussian fitted on all: hence many folds."""
    if kind not in ARRAYS:
        return _score(kind, {}, features, logits)
    fold = fold_of(len(labels), groups, folds, seed)
    out = np.empty(len(labels))
    for f in np.unique(fold):
        fit, held = fold != f, fold == f
        out[held] = _score(kind, fit_reference(kind, features[fit], labels[fit], pca_dim), features[held],
                           logits[held], k)
    return out


@dataclass
class Embedding:
    """A trained model's view of a set of preprocessed images, one row per image: penultimate
    features, logits, and the mean and sd of the model's input (all that fit_domain and
    medclf.monitor.reference.fit_reference need, so the images are run through the model once)."""

    features: np.ndarray
    logits: np.ndarray
    input_means: np.ndarray
    input_sds: np.ndarray
    appearance: Optional[np.ndarray] = None  # medclf.imaging.appearance statistics, one row per image


def embed(model: torch.nn.Module, arch: str, batches: Iterable[tuple[np.ndarray, np.ndarray]], n: int) -> Embedding:
    """`batches`: (row indices, preprocessed images (B, 1, S, S)) covering rows 0..n-1 in any order,
    e.g. a cache streamed by Ray Data: the set is never held whole, so memory does not grow with it."""
    features = logits = None
    means, sds, seen = np.empty(n, np.float32), np.empty(n, np.float32), np.zeros(n, bool)
    looks = np.empty((n, len(STAT_NAMES)))
    model.eval()
    with torch.inference_mode():
        for rows, x in batches:
            out, f = penultimate(model, arch, to_model_input(torch.from_numpy(np.ascontiguousarray(x))))
            if features is None:
                features, logits = np.empty((n, f.shape[1]), np.float32), np.empty((n, out.shape[1]), np.float32)
            features[rows], logits[rows] = f.float().numpy(), out.float().numpy()
            means[rows], sds[rows] = x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3))
            looks[rows] = [appearance_stats(image) for image in x]
            seen[rows] = True
    if not seen.all():
        raise ModelError(f"{int((~seen).sum())} of {n} images never came out of the batches to embed")
    return Embedding(features, logits, means, sds, looks)


def in_batches(x: np.ndarray, batch: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """An in-memory array as embed's (rows, images) batches."""
    for i in range(0, len(x), batch):
        yield np.arange(i, min(i + batch, len(x))), x[i:i + batch]


def features_and_logits(model: torch.nn.Module, arch: str, x: np.ndarray,
                        batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and logits of preprocessed images x (N, 1, S, S), in eval mode."""
    embedding = embed(model, arch, in_batches(x, batch), len(x))
    return embedding.features, embedding.logits


# ---------------------------------------------------------------- fitting (training)


def fit_domain(cfg, embedding: Embedding, val_y: np.ndarray, val_paths: list[str]) -> Optional[Domain]:
    """The domain record of a trained model, from its validation images: their `embedding`,
    labels `val_y`, and their files for sizes and headers. None when `ood.enabled` is off."""
    oc = cfg.ood
    if not oc.enabled:
        return None
    if len(val_y) < 4:
        raise ModelError(f"the out-of-scope guard needs at least 4 validation images, got {len(val_y)} "
                         "(or set ood.enabled=false)")
    features, logits = embedding.features, embedding.logits
    val_y = np.asarray(val_y)
    from medclf.data.labelled import patient_id_of

    patients = [patient_id_of(p, cfg.data.patient_regex) for p in val_paths]
    groups = patients if len(set(patients)) >= 4 else None
    val_scores = out_of_fold_scores(oc.score, features, logits, val_y, oc.pca_dim, cfg.run.seed,
                                    groups=groups, k=oc.knn_k)
    appearance = (fit_appearance(embedding.appearance, groups, oc.appearance_quantile, cfg.run.seed)
                  if oc.appearance and embedding.appearance is not None else None)
    threshold = float(np.quantile(val_scores, oc.quantile))
    arrays = fit_reference(oc.score, features, val_y, oc.pca_dim)
    arrays["validation_scores"] = val_scores
    facts = [_image_facts(p) for p in val_paths]
    smallest = min(min(f["width"], f["height"]) for f in facts)
    means, sds = embedding.input_means.astype(np.float64), embedding.input_sds.astype(np.float64)
    record = DomainRecord(
        score=oc.score, threshold=threshold, quantile=oc.quantile,
        validation_flag_rate=float((val_scores > threshold).mean()),
        modalities=list(cfg.data.modalities), min_size=max(oc.min_size_floor, smallest // 2),
        smallest_side_seen=smallest,
        photometric_seen=sorted({f["photometric"] for f in facts}), formats_seen=sorted({f["format"] for f in facts}),
        modalities_seen=sorted({f["modality"] for f in facts if f["modality"]}),
        input_stats={"mean_of_means": float(means.mean()), "sd_of_means": float(means.std()),
                     "mean_of_sds": float(sds.mean()), "sd_of_sds": float(sds.std())},
        n_fit=len(val_y), feature_dim=int(features.shape[1]),
        pca_dim=oc.pca_dim if oc.score == "mahalanobis" and arrays["components"].size else None,
        k=oc.knn_k if oc.score == "knn" else None,
        views=list(cfg.data.views), body_parts=list(cfg.data.body_parts), lateralities=list(cfg.data.lateralities),
        allow_missing=cfg.data.allow_missing, appearance=appearance)
    log.info("domain record: %s score, threshold %.4g (%.0f%% of validation passes), min side %d px%s",
             record.score, threshold, 100 * (1 - record.validation_flag_rate), record.min_size,
             f"; pixel statistics threshold {appearance['threshold']:.3g}" if appearance else "")
    return Domain(record, arrays)


def add_domain(artifact: str, dest: str, cfg, paths: list[str], labels: list[str]) -> Domain:
    """A copy of `artifact` at `dest` with a domain record fitted on these labelled validation
    images: for models trained before the guard (same weights, same model id). `cfg`: its `ood`
    section and `data.modalities` are used."""
    from medclf import storage
    from medclf.imaging.decode import decode
    from medclf.model.artifact import load_artifact, republish_with_files
    from medclf.imaging.preprocess import preprocess_gray

    model, card = load_artifact(artifact)
    x = np.stack([preprocess_gray(decode(storage.read_bytes(p), p).image, card.preprocess_spec) for p in paths])
    y = np.array([card.classes.index(label) for label in labels])
    domain = fit_domain(cfg, embed(model, card.arch, in_batches(x), len(x)), y, paths)
    if domain is None:
        raise ModelError("ood.enabled is false: no domain record to add")
    card.domain = domain.record.model_dump()
    republish_with_files(artifact, dest, card, {domain.record.file: domain.to_bytes()})
    return domain


_GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


def _image_facts(path: str) -> dict:
    """Size, format, photometric interpretation and modality of an image file, from its header."""
    from PIL import Image

    from medclf import storage
    from medclf.imaging.decode import sniff_format

    data = storage.read_bytes(path)
    kind = sniff_format(data, path)
    if kind == "dicom":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        return {"format": kind, "width": int(ds.get("Columns", 0)), "height": int(ds.get("Rows", 0)),
                "photometric": str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
                "modality": str(ds.get("Modality", "") or "") or None}
    with Image.open(io.BytesIO(data)) as img:
        photometric = "MONOCHROME2" if img.mode in _GRAY_MODES else ("PALETTE COLOR" if img.mode == "P" else "RGB")
        return {"format": kind, "width": img.width, "height": img.height, "photometric": photometric,
                "modality": None}


# ---------------------------------------------------------------- the artifact


def domain_of(artifact: ArtifactFiles) -> Optional[Domain]:
    """The artifact's domain record with its arrays; None for artifacts from before the guard."""
    if artifact.card.domain is None:
        return None
    record = DomainRecord.model_validate(artifact.card.domain)
    return Domain(record, artifact.arrays(record.file, ["validation_scores"] + ARRAYS.get(record.score, [])))


# ---------------------------------------------------------------- reasons


def score_reason(score: float, record: DomainRecord) -> str:
    return (f"{REASONS['ood_score']} {score:.3g} above the threshold {record.threshold:.3g} "
            f"({record.score}; {100 * record.quantile:g}% quantile of validation): unlike the training images")
