"""compress's on-disk cache: ``$COMPRESS_CACHE``, else ``~/.cache/compress``.

Sub-folders: ``models/`` (de-quantised embedded models), ``tokens/`` (token ids of text sources),
``evaluations/`` (the dense model's evaluation figures), ``checkpoints/`` (resumable training).
Every entry is written to a temporary name and renamed, so a crash never leaves a torn entry;
deleting the whole folder is always safe.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

CACHE_ENV = "COMPRESS_CACHE"


def cache_root() -> Path:
    """``$COMPRESS_CACHE`` if set, else ``~/.cache/compress``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "compress"


class Digest:
    """A short hex key (blake2b, 20 bytes) fed part by part; a part is a str or any buffer
    (bytes, a contiguous numpy array: hashed in place, not copied)."""

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=20)

    def update(self, part) -> None:
        self._hash.update(part.encode("utf-8") if isinstance(part, str) else part)
        self._hash.update(b"\x00")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def digest(*parts) -> str:
    """A short hex key of ``parts`` (see :class:`Digest`)."""
    key = Digest()
    for part in parts:
        key.update(part)
    return key.hexdigest()


def write_atomically(path: Path, write) -> None:
    """Call ``write(temporary path)`` beside ``path``, then rename it to ``path``. Cache writes are
    best effort: a read-only or full disk only means no cache."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
    except OSError:
        return
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except OSError:
        pass
    finally:
        Path(temporary).unlink(missing_ok=True)
