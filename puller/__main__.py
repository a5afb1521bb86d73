"""``python -m puller``: the same command line as ``puller``."""

import sys

from .cli import main

sys.exit(main())
