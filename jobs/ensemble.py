"""Ray job entry point: `python jobs/ensemble.py --help`, or
`ray job submit --working-dir . -- python jobs/ensemble.py --members A B --labelled FOLDER --out DEST`."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the project is the working directory, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medclf.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("ensemble", sys.argv[1:], prog="jobs/ensemble.py"))
