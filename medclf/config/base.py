"""The config's building blocks (the section base class, ConfigError, the known architectures) and the
sections every job shares: run, tracking, ray, report."""

from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medclf.errors import UserError

# The image files taken from a folder unless a config or --extensions says otherwise (training, scoring, tools).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")

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


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
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


class TrackingConfig(Section):
    enabled: bool = True
    """Log training, scoring and evaluation runs to MLflow (medclf.ops.tracking)."""
    uri: Optional[str] = None
    """MLflow tracking URI; MLFLOW_TRACKING_URI wins; default: a file store at <run.root>/mlruns."""
    experiment: Optional[str] = None
    """MLflow experiment; default: run.name."""


class RayConfig(Section):
    address: Optional[str] = None
    """None: start Ray in-process; `auto` or `ray://...`: join that cluster."""
    num_cpus: Optional[int] = Field(None, ge=1)
    """Only for an in-process Ray: cap the CPUs it may use."""


class ReportConfig(Section):
    show_paths: bool = False
    """Name files in evaluation galleries, Grad-CAM captions and heatmap file names. Off: a short hash
    of the path instead (file names often carry patient names or record numbers)."""
