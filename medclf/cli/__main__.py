"""`python -m medclf.cli COMMAND ...` (what `make demo` runs), the same as `medclf COMMAND ...`."""

import sys

from medclf.cli import main

sys.exit(main())
