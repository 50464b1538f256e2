"""Quiet, useful logs (issue 36, item 4): each of Ray's knobs is set at its source, -v turns them back,
and a local Ray's PlacementGroupCleaner can reach a state API (its own cluster's), so it stops logging
"Failed to query Ray Train Controller" every second."""

import logging
import socket

import pytest

from medclf.ops import logs
from medclf.ops.runs import local_ray_options


@pytest.fixture
def restore_verbosity(monkeypatch):
    import ray.data

    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    context = ray.data.DataContext.get_current()
    saved = (context.enable_operator_progress_bars, list(context.issue_detectors_config.detectors),
             [(h, h.level) for h in logging.getLogger("ray.data").handlers])
    yield
    context.enable_operator_progress_bars, context.issue_detectors_config.detectors = saved[0], saved[1]
    for handler, level in saved[2]:
        handler.setLevel(level)


def _console_levels():
    from ray.data._internal.logging import SessionFileHandler

    handlers = logging.getLogger("ray.data").handlers
    return {h.level for h in handlers if not isinstance(h, SessionFileHandler)}, \
        {h.level for h in handlers if isinstance(h, SessionFileHandler)}


def test_default_is_quiet_and_verbose_brings_ray_back(restore_verbosity):
    import ray.data

    context = ray.data.DataContext.get_current()
    logs.set_verbose(False)
    logs.configure_ray_data()
    console, files = _console_levels()
    assert console == {logging.WARNING} and logging.WARNING not in files  # the file log keeps everything
    assert context.enable_operator_progress_bars is False and context.issue_detectors_config.detectors == []
    assert logs.ray_logging_level() == logging.WARNING and logs.train_logging_config().log_level == "WARNING"

    logs.set_verbose(True)
    logs.configure_ray_data()
    assert _console_levels()[0] == {logging.INFO} and context.enable_operator_progress_bars is True
    assert logs.ray_logging_level() == logging.INFO and logs.train_logging_config().log_level == "INFO"
    logs.set_verbose(False)


def test_training_report_logger_is_quieted_in_the_worker(monkeypatch):
    """Ray 2.60 names that logger by file path, so LoggingConfig misses it; quiet_train_worker reaches it."""
    from ray.train.v2._internal.execution import context

    logger = logging.getLogger(context.__file__)
    saved = logger.level
    try:
        monkeypatch.setenv(logs.VERBOSE_ENV, "1")
        logger.setLevel(logging.NOTSET)
        logs.quiet_train_worker()
        assert logger.level == logging.NOTSET  # -v: Ray's reports come back
        monkeypatch.delenv(logs.VERBOSE_ENV)
        logs.quiet_train_worker()
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(saved)


def test_cli_verbose_flag_sets_the_environment(monkeypatch, tmp_path):
    from medclf.cli import run_command

    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    run_command("evaluate", ["-v", "--run-root", str(tmp_path), "--predictions", str(tmp_path / "none")])
    assert logs.verbose()
    run_command("evaluate", ["--run-root", str(tmp_path), "--predictions", str(tmp_path / "none")])
    assert not logs.verbose()


def test_local_ray_points_the_cleaner_at_its_own_state_api():
    options = local_ray_options(2)
    port = options["dashboard_port"]
    assert options["include_dashboard"] is True and options["dashboard_host"] == "127.0.0.1"
    assert options["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    with socket.socket() as s:  # the port was free when chosen
        s.bind(("127.0.0.1", port))
    # a job that never trains (score, explain) starts no dashboard and needs no runtime_env
    assert local_ray_options(2, state_api=False) == {"num_cpus": 2, "include_dashboard": False}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_state_api_the_workers_are_pointed_at_answers(ray_cluster):
    """What the PlacementGroupCleaner does each second, from a Ray worker: look up an actor by id at
    RAY_API_SERVER_ADDRESS. Before the fix that address was a closed port and every lookup failed."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def lookup(self, actor_id):
            import os

            from ray.util.state import get_actor

            state = get_actor(actor_id, timeout=30)
            return os.environ.get("RAY_API_SERVER_ADDRESS"), state.state if state else None

    probe = Probe.remote()
    address, state = ray.get(probe.lookup.remote(probe._actor_id.hex()), timeout=120)
    assert address and address.startswith("http://127.0.0.1:") and state == "ALIVE"
    ray.kill(probe)
