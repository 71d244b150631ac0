"""`python -m epee_core.cli ...`: the `epee` command without its console script (containers, subprocesses)."""

import sys

from . import main

sys.exit(main())
