"""The layer applier: a layer's blob bytes, in order, into a directory in overlayfs form, by containerd's rules.

decompress.py   compressed bytes -> the tar stream (gzip through ISA-L, zstd, or none)
tar.py          the tar stream -> entries, as Go's archive/tar reads them
apply.py        entries -> files, by containerd's pkg/archive rules (whiteouts in overlayfs form)
rootfs.py       every path resolved inside the layer's root (openat2 RESOLVE_IN_ROOT), never out of it
layer.py        one layer: the digest, the diff ID and the applier together, verified at the end
process.py      the applier in a worker process of its own, fed a layer's bytes over a socket as they arrive
worker.py       that process's side
"""

from .apply import Limits
from .layer import Applied, LayerStream

__all__ = ["Applied", "LayerStream", "Limits"]
