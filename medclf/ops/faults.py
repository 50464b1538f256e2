"""Fault injection for recovery tests: die, or wait, at a named stage of a scoring run.

`MEDCLF_FAULT=<stage>:<action>` in the driver's environment, where action is
    kill          the run dies there (SIGKILL of the driver, as a node loss or `kill -9` would)
    exit          only the current process dies (in a write task: Ray retries the task)
    wait=<file>   block until <file> exists (holds a run at a known point, no sleeps in tests);
                  `<file>.parked` is created when a process starts waiting
and `MEDCLF_FAULT_ONCE=<file>` makes the fault fire only for the first process that creates that
file. Stages of `medclf.score.batch.run_scoring` and `medclf.score.sink`, in order: `leased`, `listing`,
`before_commit` (part file written under its temporary name, not yet renamed/PUT), `after_commit`,
`before_release` (everything committed, lease still held).

The spec is read once on the driver and travels with the sink to Ray's write tasks, whose
processes do not inherit the driver's environment. Unset, every check is a no-op.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

FAULT_ENV = "MEDCLF_FAULT"
ONCE_ENV = "MEDCLF_FAULT_ONCE"
STAGES = ("leased", "listing", "before_commit", "after_commit", "before_release")


@dataclass(frozen=True)
class Fault:
    stage: str
    action: str
    driver_pid: int
    once: Optional[str] = None

    def check(self, stage: str) -> None:
        if stage != self.stage or not self._first():
            return
        if self.action.startswith("wait="):
            flag = self.action.split("=", 1)[1]
            open(flag + ".parked", "a").close()  # tests wait for this state, not for a guessed duration
            while not os.path.exists(flag):
                time.sleep(0.05)
            return
        if self.action == "kill" and os.getpid() != self.driver_pid:
            os.kill(self.driver_pid, signal.SIGKILL)
        os._exit(137)

    def _first(self) -> bool:
        if not self.once:
            return True
        try:
            with open(self.once, "x"):
                return True
        except FileExistsError:
            return False


def from_env() -> Optional[Fault]:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    stage, _, action = spec.partition(":")
    if stage not in STAGES or not (action in ("kill", "exit") or action.startswith("wait=")):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <stage>:kill|exit|wait=<file>, stage one of {STAGES}")
    return Fault(stage, action, os.getpid(), os.environ.get(ONCE_ENV))


def check(fault: Optional[Fault], stage: str) -> None:
    if fault is not None:
        fault.check(stage)
