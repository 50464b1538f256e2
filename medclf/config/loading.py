"""The whole config (`Config`), read from YAML with overrides, validated with errors that name the file
and the key, and dumped with its secrets redacted."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from medclf.config.base import (
    ConfigError,
    RayConfig,
    ReportConfig,
    RunConfig,
    Section,
    TrackingConfig,
)
from medclf.config.scoring import (
    DriftConfig,
    EvaluateConfig,
    ExplainConfig,
    OODConfig,
    ScoreConfig,
    ServeConfig,
)
from medclf.config.training import (
    DataConfig,
    ModelCardConfig,
    ModelConfig,
    PhantomConfig,
    PreprocessConfig,
    TrainConfig,
)
from medclf.secret import redact_text


class Config(Section):
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
