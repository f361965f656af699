"""Content identity: a streaming hash of a file's bytes names the track.

``content_hash`` is BLAKE2b-128 over the raw bytes (hex, 32 characters); ``track_id`` is its
first 16 hex digits. A renamed or copied file keeps its id; any changed byte changes it.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import fsspec

if TYPE_CHECKING:
    from tasks.limits import Deadline

CHUNK_BYTES = 1 << 20


def content_hash(uri: str, *, chunk_bytes: int = CHUNK_BYTES,
                 deadline: Deadline | None = None) -> str:
    """Hash a file's bytes.

    Parameters
    ----------
    uri : str
        Local path or fsspec URL.
    chunk_bytes : int
        Read size; memory use is bounded by it.
    deadline : Deadline, optional
        Checked after every chunk (raises :class:`~tasks.errors.TimeLimitExceeded`).

    Returns
    -------
    str
        32 lowercase hex digits (BLAKE2b, 16-byte digest).
    """
    digest = hashlib.blake2b(digest_size=16)
    if "://" in uri:
        with fsspec.open(uri, "rb") as fh:
            while chunk := fh.read(chunk_bytes):
                digest.update(chunk)
                if deadline:
                    deadline.check()
    else:
        with open(uri, "rb", buffering=0) as fh:
            buf = bytearray(chunk_bytes)
            view = memoryview(buf)
            while n := fh.readinto(buf):
                digest.update(view[:n])
                if deadline:
                    deadline.check()
    return digest.hexdigest()


def file_identity(uri: str) -> str | None:
    """What changes when a file is replaced or rewritten: size, mtime, ctime and inode of a
    local file (ctime cannot be set back by a writer), size and ETag or mtime of an object;
    None if the file is gone.
    """
    if "://" not in uri or uri.startswith("file://"):
        try:
            st = os.stat(uri.removeprefix("file://"))
        except OSError:
            return None
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
    except (OSError, FileNotFoundError):
        return None
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{tag}"


def track_id_of(content: str) -> str:
    """Return the track id for a content hash (its first 16 hex digits)."""
    return content[:16]


def short_hash(*parts: str, digest_size: int = 6) -> str:
    """Hash strings into ``2 * digest_size`` hex digits (for shard and run names)."""
    h = hashlib.blake2b(digest_size=digest_size)
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()
