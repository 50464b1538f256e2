"""The small records a model artifact carries in model.json beside its weights: the out-of-scope
guard's domain record (medclf.monitor.ood) and the drift reference (medclf.monitor.reference).

They live here, with the artifact format, so that validating model.json (medclf.model.artifact)
needs nothing from the monitor package that reads and fits them: the arrays stay in the monitor.
`input_gate` turns a card's domain record into the checks the image stage makes at decode time
(medclf.imaging.scope)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

DOMAIN_FILE = "domain.npz"
REFERENCE_FILE = "reference.npz"


class DomainRecord(BaseModel):
    """The small part of the domain record, stored in model.json as `domain`."""

    model_config = ConfigDict(extra="forbid")

    score: Literal["knn", "mahalanobis", "energy", "max_softmax"]
    threshold: float
    """ood_score above this: out_of_scope."""
    quantile: float
    """The threshold is this quantile of the out-of-fold validation scores."""
    validation_flag_rate: float
    """Share of validation images whose out-of-fold score is above the threshold."""
    modalities: list[str]
    """DICOM modalities accepted (empty: any). Files without the tag (JPEG/PNG) are not judged by it."""
    min_size: int
    """Images with a side shorter than this (px) are out_of_scope."""
    smallest_side_seen: int
    photometric_seen: list[str]
    formats_seen: list[str]
    modalities_seen: list[str]
    input_stats: dict[str, float]
    """Of the preprocessed validation images: mean and sd of the per-image mean and sd."""
    n_fit: int
    feature_dim: int
    pca_dim: Optional[int] = None
    k: Optional[int] = None
    """kNN score: the neighbour rank (None for other scores, and for records before kNN)."""
    file: str = DOMAIN_FILE
    views: list[str] = []
    """DICOM header rules (medclf.imaging.header; from `data.views` etc.): empty lists accept any value."""
    body_parts: list[str] = []
    lateralities: list[str] = []
    allow_missing: bool = True
    appearance: Optional[dict] = None
    """Pixel-statistics reference and threshold (medclf.imaging.appearance); None: not fitted (older records)."""


class ReferenceRecord(BaseModel):
    """The small part of the drift reference, stored in model.json as `reference`."""

    model_config = ConfigDict(extra="forbid")

    n: int
    """Validation images the reference was measured on."""
    positive_class: Optional[str]
    prevalence: Optional[float]
    """Share of validation images of the positive class."""
    predicted_positive_rate: Optional[float]
    """Share of validation images at or above the stored threshold."""
    format_mix: dict[str, int]
    modality_mix: dict[str, int]
    """DICOM modality counts; `none` for files without one (JPEG/PNG)."""
    has_ood_scores: bool
    emb_pcs: int
    emb_variance_explained: list[float]
    n_emb: int
    file: str = REFERENCE_FILE


def input_gate(card, action: str = "out_of_scope") -> Optional[dict]:
    """What the decode stage checks before any pixel reaches the model (None: nothing, for a model
    without a domain record). Modality and size always; with `ood.action: out_of_scope` also the
    DICOM header rules, the content checks and the pixel statistics (`flag` keeps the guard to what it was
    before).
    `card`: a ModelCard (medclf.model.artifact, which imports this module: not named here)."""
    if card.domain is None:
        return None
    record = DomainRecord.model_validate(card.domain)
    gate = {"modalities": record.modalities, "min_size": record.min_size}
    if action == "out_of_scope":
        gate.update(content=True, header={"views": record.views, "body_parts": record.body_parts,
                                          "lateralities": record.lateralities,
                                          "allow_missing": record.allow_missing},
                    appearance=record.appearance)
    return gate
