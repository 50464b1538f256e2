"""Who may call the endpoint: a bearer token on every route but the liveness probe.

The token is a secret (medclf.secret): the MEDCLF_SERVE_TOKEN environment variable or the file
`serve.token_file` (a mounted Kubernetes Secret), never the config. With neither, serving refuses
to start unless `serve.insecure_no_auth` is set (local development on 127.0.0.1 only).

- The liveness probe is the one exact path `<route_prefix>/healthz` (GET): it says "ok" and nothing
  else (no model id), so an unauthenticated caller learns only that something listens.
- Every other request, including one to an unknown path, needs `Authorization: Bearer <token>`,
  compared with `hmac.compare_digest` (time does not depend on how much of a guess was right).
- A refused request gets 401 and a fixed body: nothing of the request (path, header, body) echoed.
"""

from __future__ import annotations

import hmac
from typing import Optional

from medclf.secret import SecretError, resolve

TOKEN_ENV = "MEDCLF_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16  # a guessable token is no authentication
UNAUTHORIZED_BODY = {"error": "unauthorized: send Authorization: Bearer <token>"}


def serve_token(token_file: Optional[str], insecure: bool) -> Optional[str]:
    """The token replicas check; None only when `insecure` (no token configured). Raises SecretError
    when none is configured and serving would be open."""
    token = resolve(None, token_file, TOKEN_ENV, "serve.token_file")
    if token is None:
        if insecure:
            return None
        raise SecretError(f"serve: no bearer token: set the {TOKEN_ENV} environment variable or serve.token_file "
                          "(a mounted secret). For local development only: serve.insecure_no_auth=true")
    if len(token) < MIN_TOKEN_CHARS:
        raise SecretError(f"serve: the bearer token is shorter than {MIN_TOKEN_CHARS} characters; "
                          "use e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token


def liveness_path(route_prefix: str) -> str:
    return route_prefix.rstrip("/") + "/healthz"


def is_liveness(method: str, path: str, route_prefix: str) -> bool:
    """Exact match only: `/xhealthz`, `/healthz/` or `/a/healthz` are not the probe."""
    return method == "GET" and path == liveness_path(route_prefix)


def authorized(header: Optional[str], token: Optional[str]) -> bool:
    """Whether an Authorization header carries `token` (always True when no token: insecure mode)."""
    if token is None:
        return True
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
