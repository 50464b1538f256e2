"""Ray job entry point: `python jobs/serve.py --help`, or
`ray job submit --working-dir . -- python jobs/serve.py --config configs/... [options]`."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the project is the working directory, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medclf.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("serve", sys.argv[1:], prog="jobs/serve.py"))
