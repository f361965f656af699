"""Discover the files of a catalogue: a local folder, an fsspec URL prefix, or a manifest.

A source is listed once per run into :class:`SourceFile` records (URI, size, mtime); nothing
here opens audio. Every file under a folder is listed, audio or not, so unsupported files are
recorded rather than silently skipped; hidden files (``.*``) are left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec
import pandas as pd

from tasks.errors import ParameterError

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
_URI_COLUMNS = ("uri", "path", "url")


@dataclass(frozen=True)
class SourceFile:
    """A file of the catalogue as listed (no bytes read yet)."""

    uri: str
    size_bytes: int
    mtime: float


def discover(source: str) -> list[SourceFile]:
    """List the files of ``source``, sorted by URI.

    Parameters
    ----------
    source : str
        A local folder (searched recursively), a single local file, an fsspec URL prefix such
        as ``s3://bucket/catalogue/``, or a CSV/Parquet manifest with a column ``uri`` (or
        ``path``/``url``); relative manifest paths are taken from the manifest's folder.

    Returns
    -------
    list of SourceFile

    Raises
    ------
    ParameterError
        If the source does not exist or a manifest has no URI column.
    """
    is_url = "://" in source and not source.startswith("file://")
    local = source[len("file://"):] if source.startswith("file://") else source
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return _from_manifest(source)
    if not is_url:
        if os.path.isdir(local):
            return _walk_local(os.path.abspath(local))
        if os.path.isfile(local):
            st = os.stat(local)
            return [SourceFile(os.path.abspath(local), st.st_size, st.st_mtime)]
        raise ParameterError(f"source not found: {source}")
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.exists(root):
        raise ParameterError(f"source not found: {source}")
    found = fs.find(root, detail=True)
    files = []
    for path, info in found.items():
        if info.get("type") == "directory" or os.path.basename(path).startswith("."):
            continue
        files.append(SourceFile(fs.unstrip_protocol(path), int(info.get("size") or 0),
                                _mtime(info)))
    return sorted(files, key=lambda f: f.uri)


def listing_scope(source: str) -> str | None:
    """The URI prefix every file ``source`` lists starts with, so a known file under it that
    a listing lacks is gone; ``None`` for a manifest (a file left out of a manifest is not
    deleted). A single file's scope is its own URI.
    """
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return None
    if "://" in source and not source.startswith("file://"):
        fs, root = fsspec.core.url_to_fs(source)
        return str(fs.unstrip_protocol(root.rstrip("/"))) + "/"
    local = os.path.abspath(source.removeprefix("file://"))
    return local.rstrip("/") + "/" if os.path.isdir(local) else local


def in_scope(uri: str, scope: str) -> bool:
    """Whether ``uri`` lies in a :func:`listing_scope`."""
    return uri.startswith(scope) if scope.endswith("/") else uri == scope


def _walk_local(root: str) -> list[SourceFile]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # vanished or a dangling link: listed so the run records it
                files.append(SourceFile(path, -1, 0.0))
                continue
            files.append(SourceFile(path, st.st_size, st.st_mtime))
    return sorted(files, key=lambda f: f.uri)


def _from_manifest(manifest: str) -> list[SourceFile]:
    if manifest.lower().endswith(".csv"):
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    else:
        table = pd.read_parquet(manifest)
    column = next((c for c in _URI_COLUMNS if c in table.columns), None)
    if column is None:
        raise ParameterError(
            f"manifest {manifest} needs one of the columns {list(_URI_COLUMNS)}; "
            f"found {list(table.columns)}"
        )
    base = os.path.dirname(os.path.abspath(manifest)) if "://" not in manifest else None
    files = []
    for raw in table[column].astype(str):
        uri = raw.strip()
        if not uri:
            continue
        if "://" not in uri and not os.path.isabs(uri) and base is not None:
            uri = os.path.normpath(os.path.join(base, uri))
        files.append(_stat(uri))
    return sorted(set(files), key=lambda f: f.uri)


def _stat(uri: str) -> SourceFile:
    try:
        if "://" in uri and not uri.startswith("file://"):
            fs, path = fsspec.core.url_to_fs(uri)
            info = fs.info(path)
            return SourceFile(uri, int(info.get("size") or 0), _mtime(info))
        st = os.stat(uri.removeprefix("file://"))
        return SourceFile(uri, st.st_size, st.st_mtime)
    except (OSError, FileNotFoundError):
        return SourceFile(uri, -1, 0.0)  # recorded as failed at probe


def _mtime(info: dict) -> float:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            try:
                return pd.Timestamp(value).timestamp()
            except ValueError:
                continue
    return 0.0
