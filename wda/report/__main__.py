"""``python -m wda.report CKPT_DIR``: see ``wda.report.cli``."""

import sys

from wda.report.cli import main

sys.exit(main())
