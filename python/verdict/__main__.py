"""`python -m verdict ...`: the `verdict` command."""

import sys

from verdict._cli import main

sys.exit(main())
