"""``python -m puller``: the same command line as ``puller``."""

from .cli import run

run()
