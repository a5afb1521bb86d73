"""``python -m puller``: the same command line as ``puller``."""

from .command import run

run()
