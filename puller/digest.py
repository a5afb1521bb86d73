"""A validated content digest. Nothing becomes a path before it has been parsed here."""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

from .errors import InvalidDigest

# algorithm -> (hex length, hashlib constructor name)
SUPPORTED_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")


class Digest(NamedTuple):
    """``algorithm:hex`` with a supported algorithm and lowercase hex of the right length."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        if not isinstance(text, str):
            raise InvalidDigest(f"digest must be a string, got {type(text).__name__}")
        algorithm, sep, hex_part = text.partition(":")
        if not sep:
            raise InvalidDigest(f"invalid digest {text[:100]!r}: expected algorithm:hex")
        length = SUPPORTED_ALGORITHMS.get(algorithm)
        if length is None:
            raise InvalidDigest(f"unsupported digest algorithm {algorithm[:20]!r} in {text[:100]!r}")
        if len(hex_part) != length or not _HEX.fullmatch(hex_part):
            raise InvalidDigest(f"invalid {algorithm} hex in digest {text[:100]!r}")
        return cls(algorithm, hex_part)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
