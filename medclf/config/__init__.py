"""Typed job configuration: YAML in, validated objects out.

One `Config` describes a whole run (data, preprocessing, model, training, scoring, evaluation,
Ray). Every job reads the same file, so the model trained is the model scored. Validation is
strict: an unknown key or a bad value fails at once, naming the key and the file, before any
work starts. pydantic does the type checking (it ships with ray[default] anyway).

The package's face: `from medclf.config import ...` for every section and function. The parts: base
(shared sections), training, scoring (the sections of each side), loading (YAML, overrides, dump).
"""

from medclf.config.base import (IMAGE_EXTENSIONS, MODEL_ARCHS, ConfigError, RayConfig, ReportConfig,  # noqa: F401
                                RunConfig, Section, TrackingConfig)
from medclf.config.loading import (SECRET_KEYS, Config, apply_overrides, dump_config, load_config,  # noqa: F401
                                   set_values)
from medclf.config.scoring import (DriftConfig, EvaluateConfig, ExplainConfig, OODConfig, ScoreConfig,  # noqa: F401
                                   ServeConfig)
from medclf.config.training import (AugmentConfig, DataConfig, ModelCardConfig, ModelConfig,  # noqa: F401
                                    PhantomConfig, PreprocessConfig, TrainConfig)
