"""``python -m slugkit.cli ...`` is ``slug ...``."""

import sys

from ..common.interrupts import ignore_while_exiting
from . import main

rc = main()
ignore_while_exiting()  # as the `slug` program: a signal during shutdown does not replace the command's status
sys.exit(rc)
