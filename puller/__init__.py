"""puller: make a whole container image present on a node, fast.

Public API: :func:`puller.engine.pull.pull_image`, :class:`puller.reference.Reference`,
:class:`puller.digest.Digest`, the stores in :mod:`puller.stores` and the errors in :mod:`puller.errors`.
"""

__version__ = "0.1.0"
