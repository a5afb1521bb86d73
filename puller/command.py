"""The ``puller`` command and ``python -m puller``: :func:`puller.cli.run`, with the cyclic garbage collector off
while the command line's modules are imported. It would walk the objects they make again and again (5-9 ms of
every command here); :func:`~puller.cli.main` freezes them once imported."""

import gc

gc.disable()
from .cli import run  # noqa: E402

gc.enable()

__all__ = ["run"]
