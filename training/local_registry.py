"""The embedded MLflow registry read without MLflow, for the start of ``mtag score``.

``mtag score`` must know which exact model version it scores with, and that model's
``meta.json``, before it decides whether there is work and boots anything (decisions 57 and
70). Through MLflow that costs the command 2.0-2.6 CPU-seconds before anything else can
start: importing MLflow (1.2-1.4 s) and building its SQLAlchemy store (about 1.2 s, nearly
all of it SQLAlchemy mapping MLflow's 71 table classes), for two rows of a SQLite file.

:func:`resolve` reads those rows with the standard library's ``sqlite3``, read-only, and copies
the model's tagger folder into a fresh temporary folder, as MLflow's download would. It only
answers where the answer is certain to be MLflow's own:

* the tracking URI is a plain ``sqlite:///`` file that exists (the embedded default, or a
  store's folder), and no ``MLFLOW_REGISTRY_URI`` or workspace setting points elsewhere;
* the database's Alembic revision is one this code was checked against
  (:data:`KNOWN_REVISIONS`; a test fails when the installed MLflow writes another, so an
  upgrade is checked before it is trusted);
* the version is ``READY`` and not deleted, in the default workspace, and its artifacts are in
  a local folder holding the tagger's ``meta.json``.

Anything else, including a model or alias that is not there, returns None and the caller asks
MLflow, whose answer (and error message) is the authority. Nothing here writes to the
database.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import urllib.parse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featurestore.store import FeatureStore

KNOWN_REVISIONS = frozenset({"dc11669786a5"})
"""Alembic revisions of MLflow's tracking schema whose registry tables :func:`resolve` reads
(``registered_model_aliases``: name, alias, version, workspace; ``model_versions``: name,
version, run_id, status, current_stage, storage_location, workspace). dc11669786a5: the
head of MLflow 3.17."""

DOWNLOAD_PREFIX = "mtag-model-"
"""Name prefix of the temporary folder a model is downloaded or copied into."""

TAGGER_DIR = ("artifacts", "artifact")
"""Where the tagger's own folder (``meta.json``, weights) is inside a registered model."""

_DELETED = "Deleted_Internal"  # MLflow's stage of a soft-deleted version
_WORKSPACE = "default"


def store_uri(store: FeatureStore) -> str:
    """``MLFLOW_TRACKING_URI``, else the store's embedded SQLite (its folder made).

    Raises
    ------
    StoreError
        For an object-store store without ``MLFLOW_TRACKING_URI``: a registry must be shared
        by every machine that scores, so it cannot be a file on one of them.
    """
    from tasks.errors import StoreError

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if not store.is_local:
        raise StoreError(f"store {store.url} is on an object store: set "
                         "MLFLOW_TRACKING_URI to an MLflow server (`mtag stack up` runs "
                         "one) or a database URI")
    os.makedirs(store.mlflow_dir(), exist_ok=True)
    return f"sqlite:///{store.mlflow_db()}"


def resolve(tracking_uri: str, model_uri: str) -> tuple[dict[str, str], str] | None:
    """The version behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` and a copy of its
    tagger folder, read without MLflow; None where MLflow must answer (see the module).

    Returns
    -------
    (dict, str) or None
        ``name``, ``version`` and ``run_id`` (as :func:`training.tracking.resolve`), and the
        copied folder (:func:`remove_artifact_dir` removes it).
    """
    path = _sqlite_path(tracking_uri)
    ref = _parse(model_uri)
    if path is None or ref is None or not _settings_allow(tracking_uri):
        return None
    name, alias, version = ref
    try:
        with contextlib.closing(sqlite3.connect(
                f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, timeout=5.0)) as db:
            revisions = [r[0] for r in db.execute("SELECT version_num FROM alembic_version")]
            if len(revisions) != 1 or revisions[0] not in KNOWN_REVISIONS:
                return None
            if alias is not None:
                row = db.execute(
                    "SELECT version FROM registered_model_aliases "
                    "WHERE name = ? AND alias = ? AND workspace = ?",
                    (name, alias, _WORKSPACE)).fetchone()
                if row is None:
                    return None
                version = str(row[0])
            found = db.execute(
                "SELECT run_id, status, current_stage, storage_location FROM model_versions "
                "WHERE name = ? AND version = ? AND workspace = ?",
                (name, int(version or 0), _WORKSPACE)).fetchone()
    except (sqlite3.Error, ValueError):
        return None
    if found is None:
        return None
    run_id, status, stage, location = found
    source = _local_folder(location) if status == "READY" and stage != _DELETED else None
    if source is None:
        return None
    tagger = os.path.join(source, *TAGGER_DIR)
    if not os.path.isfile(os.path.join(tagger, "meta.json")):
        return None
    root = tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX)
    try:
        shutil.copytree(tagger, os.path.join(root, *TAGGER_DIR))
    except OSError:
        shutil.rmtree(root, ignore_errors=True)
        return None
    return ({"name": name, "version": str(version), "run_id": str(run_id or "")},
            os.path.join(root, *TAGGER_DIR))


def remove_artifact_dir(directory: str) -> None:
    """Remove the temporary download or copy behind a model folder (nothing for a folder that
    is not one).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(directory)))
    if os.path.basename(root).startswith(DOWNLOAD_PREFIX) and \
            os.path.dirname(root) == os.path.abspath(tempfile.gettempdir()):
        shutil.rmtree(root, ignore_errors=True)


def _sqlite_path(uri: str) -> str | None:
    """The file of a plain ``sqlite:///PATH`` URI that exists; None for anything else."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or "?" in uri or "#" in uri:
        return None
    path = uri[len(prefix):]
    return path if path and os.path.isfile(path) else None


def _settings_allow(tracking_uri: str) -> bool:
    """No setting sends MLflow's registry (or workspace) elsewhere than ``tracking_uri``."""
    registry = os.environ.get("MLFLOW_REGISTRY_URI")
    if registry and registry != tracking_uri:
        return False
    return not any(k.startswith("MLFLOW_") and "WORKSPACE" in k for k in os.environ)


def split_model_uri(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """``(name, alias, version)`` of ``models:/NAME@ALIAS`` (version None) or
    ``models:/NAME/VERSION`` (alias None), unchecked; both None when the rest is neither
    form, and None for a URI that is not ``models:/``.
    """
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/"):].strip("/")
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, None, version
    return ref, None, None


def _parse(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """:func:`split_model_uri` where it names a version or an alias this module reads (a
    name and an alias, or a name and a numeric version); None for anything else.
    """
    split = split_model_uri(model_uri)
    if split is None:
        return None
    name, alias, version = split
    if name and (alias or (version and version.isdigit())):
        return split
    return None


def _local_folder(location: str | None) -> str | None:
    """The local folder of a ``file://`` artifact location (or a plain path); None else."""
    if not location:
        return None
    if location.startswith("file://"):
        parsed = urllib.parse.urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            return None
        location = urllib.parse.unquote(parsed.path)
    elif "://" in location or ":" in location.split("/", 1)[0]:
        return None
    return location if os.path.isdir(location) else None
