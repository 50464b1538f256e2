"""Ray job entry point: `python jobs/drift.py --help`, or
`ray job submit --working-dir . -- python jobs/drift.py --config configs/... --run-date YYYY-MM-DD`.
Exit status 4 when a drift flag trips (README, 'Drift reports')."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the project is the working directory, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medclf.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("drift", sys.argv[1:], prog="jobs/drift.py"))
