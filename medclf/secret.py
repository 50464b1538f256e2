"""Secrets (the site's UID key, the serving token): where they come from, and how they never leave.

One rule for every secret: it is read from an environment variable or from a file mounted by the
platform (a Kubernetes Secret volume, a file readable only by the service account), and never from a
committed config. A config may name the *file*; a value written inline is refused unless
`allow_inline_secret: true` (for tests and throw-away local runs). Wherever a config is written
(run configs, MLflow params, model.json, the model card, logs), a secret appears as REDACTED: the
config type is pydantic's SecretStr, whose dump is this marker, never the value.

Deliberately imports nothing from medclf but errors: medclf.config uses it.
"""

from __future__ import annotations

import os
from typing import Optional

from medclf.errors import UserError

REDACTED = "**********"  # pydantic's SecretStr dump; a saved config holding it reads back as "not set"


class SecretError(UserError):
    """A secret that is missing, unreadable, or written where it would be persisted."""


def reveal(value) -> Optional[str]:
    """The plain text of a SecretStr (or str); None for unset or for the redaction marker."""
    if value is None:
        return None
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    return None if text in ("", REDACTED) else text


def read_secret_file(path: str, what: str) -> str:
    """The secret in `path` (surrounding whitespace stripped); the error names the file, never the content."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            text = f.read(64 * 1024).decode("utf-8").strip()
    except OSError as exc:
        raise SecretError(f"{what}: cannot read the secret file {path} ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise SecretError(f"{what}: the secret file {path} is not UTF-8 text") from None
    if not text:
        raise SecretError(f"{what}: the secret file {path} is empty")
    return text


def resolve(inline, file: Optional[str], env: str, what: str) -> Optional[str]:
    """The secret: the inline value (tests only; config validation refuses it otherwise), else the
    mounted file, else the environment variable `env`; None when none is set."""
    value = reveal(inline)
    if value:
        return value
    if file:
        return read_secret_file(file, what)
    return os.environ.get(env) or None


def redact_text(text: str, secrets: list) -> str:
    """`text` with every non-empty secret value replaced by the marker (for messages that quote input)."""
    for s in secrets:
        s = reveal(s)
        if s:
            text = text.replace(s, REDACTED)
    return text
