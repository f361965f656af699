"""Whether the temporary Prefect API's database is already at its schema, so that the server
can skip its migration check.

Prefect's server runs Alembic's ``upgrade head`` on every start (``migrate_on_start``):
Alembic imports every migration script to find the head, 0.6-1.3 of the server's 3.4-4.1
CPU-seconds of start-up, on the command's critical path (the flow run waits for the API).
After a start that migrated, :func:`record` writes down which Prefect release left the
database at which revision; the next start skips the check (:func:`at_schema`) only when
the same release finds the same file at that revision. Anything else (a new Prefect, a
deleted or replaced file, a revision another release wrote, a database that is not the
default SQLite file) migrates as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from importlib import metadata

MARKER = "mtag-prefect-db.json"
"""The record's name in ``PREFECT_HOME``."""

URL_SETTINGS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")
"""Settings naming another database than the default SQLite file."""


def database(home: str) -> str | None:
    """The server's SQLite file under ``home`` (Prefect's default), or None where a setting
    in the environment names another database.
    """
    if any(os.environ.get(k) for k in URL_SETTINGS):
        return None
    return os.path.join(home, "prefect.db")


def _state(db: str) -> dict[str, str] | None:
    try:
        prefect = metadata.version("prefect")
    except metadata.PackageNotFoundError:
        return None
    if not os.path.isfile(db):
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=1.0)) as con:
            rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return None
    if not rows:
        return None
    return {"prefect": prefect, "database": os.path.abspath(db),
            "revision": ",".join(sorted(str(r[0]) for r in rows))}


def at_schema(home: str) -> bool:
    """Whether the database was migrated by this Prefect release and has not changed its
    revision since (:func:`record`).
    """
    db = database(home)
    if db is None:
        return False
    try:
        with open(os.path.join(home, MARKER)) as fh:
            recorded = json.load(fh)
    except (OSError, ValueError):
        return False
    state = _state(db)
    return state is not None and recorded == state


def record(home: str) -> None:
    """Write down the database's revision after a start that migrated it (best effort)."""
    db = database(home)
    state = _state(db) if db is not None else None
    if state is None:
        return
    path = os.path.join(home, MARKER)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
