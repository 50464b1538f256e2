"""How much a run prints. By default: medclf's own lines, one progress bar per Ray Data stage (on a
terminal), and warnings a user can act on; `-v` (or MEDCLF_VERBOSE=1) brings Ray's detail back.

Each knob is Ray's own setting, set where the lines are made (nothing filters printed text):
- `ray.init(logging_level=...)`: Ray core's INFO lines in the driver ("Started a local Ray instance");
- `ray.train.LoggingConfig`: Ray Train's `ray.train` loggers in controller and workers (the
  "Reporting training result {...}" dump per epoch and rank);
- the console handler of the `ray.data` logger: Ray Data's execution plans and, off a terminal,
  its progress printed as log lines every 10 s. Its file log (ray-data.log in the session folder)
  keeps everything;
- `DataContext.enable_operator_progress_bars`: one bar per dataset, not one per operator.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "MEDCLF_VERBOSE"


def set_verbose(verbose: bool) -> None:
    """The CLI's -v; an environment variable, so `ray job submit` drivers and subprocesses agree."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def say(message: str) -> None:
    """One of medclf's own progress lines, on stdout as `[medclf] ...`."""
    # Ray Train V2 patches print() to tee into its logger, which doubles each line in the
    # driver's output; writing to stdout directly prints once.
    sys.stdout.write(f"[medclf] {message}\n")
    sys.stdout.flush()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def ray_logging_level() -> int:
    return logging.INFO if verbose() else logging.WARNING


def train_logging_config():
    """Ray Train's own log level for this run's controller and workers."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def quiet_train_worker() -> None:
    """In a Ray Train worker: the per-epoch "Reporting training result N: TrainingReport(...)" record.

    Ray 2.60 logs it from `ray.train.v2._internal.execution.context` with `logging.getLogger(__file__)`,
    a logger named by its file path, not `ray.train.*`: LoggingConfig(log_level) does not reach it and
    the worker's root logger (INFO) prints it once per epoch and worker. Its own logger's level is set
    here, in the process that makes the line."""
    if verbose():
        return
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_python_warnings() -> None:
    """Ray Data's deprecation of `ray_remote_args` fires on medclf's own `max_retries=`, which Ray 2.60 has
    no named parameter for yet: nothing a user can act on, so shown only with -v."""
    if not verbose():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")


def configure_ray_data() -> None:
    """Ray Data's console output for this driver process (call after Ray Data is imported)."""
    import ray.data
    from ray.data._internal.logging import SessionFileHandler

    context = ray.data.DataContext.get_current()
    context.enable_operator_progress_bars = verbose()
    if not verbose():
        # Ray Data's issue detectors advise on its own tuning ("set memory=... in the appropriate function
        # call"): advice for medclf's developers, who run with -v, not for a user of the command.
        context.issue_detectors_config.detectors = []
    if not verbose():
        # Ray warns once per process that operator bars are off and how to turn them on; they are off on
        # purpose here, and -v turns them on. Taking Ray's own once-key leaves that one line unsaid.
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_global")
    level = logging.INFO if verbose() else logging.WARNING
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):  # the file log keeps DEBUG
            handler.setLevel(level)
