"""``python -m wda.train``: see ``wda.train.cli``."""

import sys

from wda.train.cli import main

sys.exit(main())
