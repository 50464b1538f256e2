"""The config sections of using a model: score, ood, explain, evaluate, serve, drift."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field, SecretStr, field_validator, model_validator

from medclf.config.base import IMAGE_EXTENSIONS, Section
from medclf.config.training import DataConfig
from medclf.secret import REDACTED


# Arithmetic of the answering forward pass; medclf.score.precision says what each value runs as.
Precision = Literal["auto", "float32", "bfloat16", "float16"]


def check_precision(precision: str, runtime: str, use_gpu: bool) -> None:
    """A precision the runtime or device cannot run is a config error (before any work); whether a CPU
    node has native bfloat16 is checked on the node (medclf.score.precision)."""
    if runtime == "onnxruntime" and precision not in ("auto", "float32"):
        raise ValueError(f"precision {precision} runs on the torch runtime only; ONNX Runtime scores in float32")
    if precision == "float16" and not use_gpu:
        raise ValueError("precision float16 needs use_gpu: true (on a CPU use bfloat16 or float32)")


class ScoreConfig(Section):
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
    extensions: list[str] = list(IMAGE_EXTENSIONS)
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
    precision: Precision = "auto"
    """Arithmetic of the model's forward pass (torch runtime; medclf.score.precision): `auto` is float16
    autocast on a GPU and float32 on a CPU; `bfloat16` autocasts on either (a CPU needs native bfloat16:
    AVX512-BF16 or AMX). On the build machine's Xeon bfloat16 ran the forward pass 1.75x faster and moved
    probabilities by up to 0.078 (1 decision in 399 changed): docs/performance.md. An opt-in, never the default."""
    compile: bool = False
    """Run the model under torch.compile (torch runtime; medclf.model.compiled): compiled at the actor's
    first batch and again for each new batch shape, so it can pay only on long runs, on GPU nodes. On the
    2-core CPU machine it compiled in 11 s and then ran 0.90x the eager network (docs/performance.md)."""
    jpeg_decode: Literal["auto", "tasks", "actor"] = "auto"
    """Where JPEGs are decoded (medclf.imaging.device_decode): `tasks`, the CPU decode tasks (with draft mode);
    `actor`, the inference actor, in batches on its device (nvJPEG on a GPU; on a CPU only slower); `auto`,
    the actor for JPEGs whose shorter side is at least 4x the model's input (a 2,048^2 film for a 224 px
    model) when the actors have GPUs, else the tasks. PNG and DICOM always decode in the tasks."""
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

    @model_validator(mode="after")
    def _precision_runs(self):
        check_precision(self.precision, self.runtime, self.use_gpu)
        if self.compile and self.runtime != "torch":
            raise ValueError("compile: true runs on the torch runtime only (runtime: torch)")
        return self


class OODConfig(Section):
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


class ExplainConfig(Section):
    """Grad-CAM heatmaps (`medclf explain`, and `score.explain_flagged`)."""

    layer: Optional[str] = None
    """Module name, e.g. `layer4`; None: the architecture's default (medclf.report.gradcam.DEFAULT_LAYERS)."""
    target: str = "predicted"
    """Class whose evidence is shown: `predicted` (the model's decision) or a class name."""
    output: Optional[str] = None
    """Heatmaps folder; default `<run folder>/explanations`."""
    site_profile: Optional[str] = None
    """A site profile (.npz, from a `score.adapt` run) whose BatchNorm statistics the maps are made with, so
    they explain the answers that run gave; `score.explain_flagged` uses the run's own profile."""
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0.0)


class EvaluateConfig(Section):
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


class ServeConfig(Section):
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
    precision: Precision = "auto"
    """Arithmetic of the model's forward pass (torch runtime; medclf.score.precision): `auto` is float16
    autocast on a GPU and float32 on a CPU; `bfloat16` autocasts on either (a CPU needs native bfloat16:
    AVX512-BF16 or AMX). On the build machine's Xeon bfloat16 ran the forward pass 1.75x faster and moved
    probabilities by up to 0.078 (1 decision in 399 changed): docs/performance.md. An opt-in, never the default."""
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

    @model_validator(mode="after")
    def _precision_runs(self):
        check_precision(self.precision, self.runtime, self.use_gpu)
        return self


class DriftConfig(Section):
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
