"""The ``puller`` command and ``python -m puller``: :func:`puller.cli.run`, with the cyclic garbage collector off
while the command line's modules are imported. It would walk the objects they make again and again (5-9 ms of
every command here); they live as long as the process, so they are frozen (never walked again) before it is
turned back on, or its first run would walk them all at once."""

import gc

gc.disable()
from .cli import run  # noqa: E402

gc.freeze()
gc.enable()

__all__ = ["run"]
