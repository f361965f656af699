"""Whole-object writes and reads of the store's small records, safe against a concurrent writer.

Two processes may write one record at once: two hosts creating one new store (``store.json``,
a feature set's ``featureset.json``), or the commit lease. A reader must then see one whole
version, never part of one, and never fail because the object was replaced while it read:

- :func:`put` replaces a record in one step: ``os.replace`` of a finished temporary file on a
  local disk, one PUT on an object store (a PUT is atomic there; the copy and delete that
  fsspec's ``mv`` makes of a move is two requests, and a reader in between sees neither).
- :func:`put_if_absent` creates a record unless it exists, and says which writer won:
  ``os.link`` of a finished temporary file locally (atomic and never half-written, unlike
  ``O_EXCL`` followed by a write), a PUT with ``If-None-Match: *`` on S3. On other fsspec
  filesystems it can only look first, which leaves a window: callers there write records
  whose racing versions are equivalent.
- :func:`get` reads a record in one GET (``cat_file``). A file object opened on S3 pins the
  object's ETag and fails with ``FileExpired`` once another writer replaced the object between
  its first and a later ranged read: the failure CI hit with two ingests creating one store.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import uuid
from typing import Any

from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem


def is_s3(fs: Any) -> bool:
    """Whether ``fs`` is s3fs's filesystem (conditional PUTs available).

    Told without importing s3fs (botocore and aiobotocore with it: 0.4 s, paid by the first
    commit lease of a local store, in the command's process while the workers ran): an
    instance of its filesystem exists only once s3fs is imported.
    """
    module = sys.modules.get("s3fs")
    return module is not None and isinstance(fs, module.S3FileSystem)


def _finished_tmp(path: str, data: bytes) -> str:
    """A temporary file beside ``path`` holding ``data`` in full."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def put(fs: Any, path: str, data: bytes) -> None:
    """Replace ``path``'s content with ``data`` in one step (parents created)."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = _finished_tmp(path, data)
        try:
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def put_if_absent(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists; ``True`` if this call created it."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = _finished_tmp(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # a filesystem without hard links: create, then write
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            return _create_exclusive(path, data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    if is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        try:
            sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data,
                 IfNoneMatch="*")
        except FileExistsError:  # 412 Precondition Failed: it exists
            return False
        except OSError as exc:  # 409 ConditionalRequestConflict: a concurrent create won
            if exc.errno == errno.EBUSY:
                return False
            raise
        return True
    if fs.exists(path):
        return False
    put(fs, path, data)
    return True


def _create_exclusive(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return True


def get(fs: Any, path: str) -> bytes:
    """The whole content of ``path``, read in one request (``FileNotFoundError`` if none)."""
    data: bytes = fs.cat_file(path)
    return data
