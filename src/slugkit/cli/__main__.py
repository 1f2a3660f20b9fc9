"""``python -m slugkit.cli ...`` is ``slug ...``."""

import sys

from . import main

sys.exit(main())
