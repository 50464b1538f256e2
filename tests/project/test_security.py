"""Secrets, serving auth and the memory budget as config and unit rules (no Ray; issue 34, docs/security.md)."""

import asyncio

import pytest
import yaml

from medclf.config import ConfigError, dump_config, load_config
from medclf.secret import REDACTED, SecretError

KEY = "planted-key-5a1c9e"


def test_inline_secret_is_refused_without_echoing_it():
    with pytest.raises(ConfigError, match="set the MEDCLF_UID_KEY environment variable or score.uid_key_file") as info:
        load_config(None, [f"score.uid_key={KEY}"])
    assert KEY not in str(info.value)


def test_inline_secret_allowed_for_tests_is_redacted_in_dumps_and_repr(tmp_path):
    cfg = load_config(None, [f"score.uid_key={KEY}", "run.allow_inline_secret=true"])
    text = dump_config(cfg)
    assert KEY not in text and KEY not in repr(cfg) and KEY not in str(cfg.model_dump())
    assert yaml.safe_load(text)["score"]["uid_key"] == REDACTED
    saved = tmp_path / "score_config.yaml"
    saved.write_text(text)
    again = load_config(saved)  # a saved config re-runs: the marker reads back as "not set", no inline secret
    assert again.score.uid_key is None
    from medclf.imaging.privacy import uid_key

    assert uid_key(cfg.score.uid_key, cfg.score.uid_key_file) == KEY


def test_uid_key_from_a_mounted_file_or_the_environment(tmp_path, monkeypatch):
    from medclf.imaging.privacy import uid_key

    monkeypatch.setenv("MEDCLF_UID_KEY", "from-env")
    key_file = tmp_path / "uid_key"
    key_file.write_text(KEY + "\n")
    cfg = load_config(None, [f"score.uid_key_file={key_file}"])
    assert uid_key(cfg.score.uid_key, cfg.score.uid_key_file) == KEY  # the file wins over the environment
    assert str(key_file) in dump_config(cfg) and KEY not in dump_config(cfg)
    assert uid_key(None, None) == "from-env"
    with pytest.raises(SecretError, match="cannot read the secret file .*missing"):
        uid_key(None, str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecretError, match="empty"):
        uid_key(None, str(tmp_path / "empty"))


def test_serve_token_rules(tmp_path, monkeypatch):
    from medclf.score.auth import authorized, is_liveness, serve_token

    monkeypatch.delenv("MEDCLF_SERVE_TOKEN", raising=False)
    with pytest.raises(SecretError, match="no bearer token"):
        serve_token(None, insecure=False)
    assert serve_token(None, insecure=True) is None
    monkeypatch.setenv("MEDCLF_SERVE_TOKEN", "short")
    with pytest.raises(SecretError, match="shorter than 16"):
        serve_token(None, insecure=False)
    token_file = tmp_path / "token"
    token_file.write_text("t" * 32)
    token = serve_token(str(token_file), insecure=False)
    assert token == "t" * 32
    assert authorized(f"Bearer {token}", token) and authorized(f"bearer {token}", token)
    for header in (None, "", token, f"Basic {token}", f"Bearer {token}x", f"Bearer {token[:-1]}", "Bearer "):
        assert not authorized(header, token)
    assert is_liveness("GET", "/healthz", "/") and is_liveness("GET", "/api/healthz", "/api")
    for method, path in (("GET", "/xhealthz"), ("GET", "/healthz/"), ("GET", "/a/healthz"), ("POST", "/healthz")):
        assert not is_liveness(method, path, "/")


def test_serving_refuses_to_start_without_a_token(monkeypatch):
    from medclf.score.serve import build_app

    monkeypatch.delenv("MEDCLF_SERVE_TOKEN", raising=False)
    with pytest.raises(SecretError, match="MEDCLF_SERVE_TOKEN"):
        build_app(load_config(None), "some/model")
    with pytest.raises(ConfigError, match="insecure_no_auth is for local development"):
        load_config(None, ["serve.insecure_no_auth=true", "serve.host=0.0.0.0"])


def test_memory_budget_caps_requests_times_size():
    cfg = load_config(None)
    sv = cfg.serve
    assert sv.max_ongoing_requests * sv.max_file_mb * 2 <= sv.memory_budget_mb
    with pytest.raises(ConfigError, match="over serve.memory_budget_mb"):
        load_config(None, ["serve.max_ongoing_requests=64", "serve.max_file_mb=64"])


class _Request:
    """What read_limited needs of a Starlette request: headers and an async byte stream."""

    def __init__(self, chunks, headers=None):
        self.headers, self.chunks, self.pulled = headers or {}, chunks, 0

    async def stream(self):
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


def test_body_is_cut_at_the_limit_whatever_content_length_says():
    from medclf.score.upload import TooLarge, read_limited

    def endless():
        while True:
            yield b"\0" * 1024

    lying = _Request(endless(), {"content-length": "10"})  # claims 10 bytes, sends forever
    with pytest.raises(TooLarge):
        asyncio.run(read_limited(lying, 4096))
    assert lying.pulled == 5  # stopped at the first chunk past the limit
    with pytest.raises(TooLarge) as info:
        asyncio.run(read_limited(_Request([b"never read"], {"content-length": "5000"}), 4096))
    assert info.value.declared and info.value.size == 5000
    assert asyncio.run(read_limited(_Request([b"ab", b"cd"]), 4)) == b"abcd"
