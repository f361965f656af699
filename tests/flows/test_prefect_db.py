"""The temporary API's migration check is skipped only where this Prefect release left the
default database at its revision (flows/prefect_db.py)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

from flows import prefect_db


def _database(home, revision="abc123"):
    db = home / "prefect.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num TEXT)")
        con.execute("DELETE FROM alembic_version")
        con.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    return db


def test_at_schema_only_after_a_record_of_the_same_release_and_revision(tmp_path,
                                                                         monkeypatch):
    for key in prefect_db.URL_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    home = tmp_path
    assert not prefect_db.at_schema(str(home))  # no database
    _database(home)
    assert not prefect_db.at_schema(str(home))  # no record
    prefect_db.record(str(home))
    assert prefect_db.at_schema(str(home))
    marker = json.loads((home / prefect_db.MARKER).read_text())
    assert marker["revision"] == "abc123" and marker["database"] == str(home / "prefect.db")
    _database(home, "def456")  # another release migrated it since
    assert not prefect_db.at_schema(str(home))
    prefect_db.record(str(home))
    assert prefect_db.at_schema(str(home))
    (home / prefect_db.MARKER).write_text(json.dumps(marker | {"revision": "def456",
                                                                "prefect": "0.0.1"}))
    assert not prefect_db.at_schema(str(home))  # recorded by another Prefect release
    prefect_db.record(str(home))
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://h/db")
    assert not prefect_db.at_schema(str(home))  # another database: Prefect decides
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL")
    (home / prefect_db.MARKER).write_text("{torn")
    assert not prefect_db.at_schema(str(home))


def test_a_second_temporary_api_skips_the_check_and_serves_runs(tmp_path):
    """Two starts on one fresh PREFECT_HOME: the first migrates and records, the second
    starts on the recorded schema and answers a query that reads the tables."""
    code = textwrap.dedent("""
        import httpx, time
        from flows import prefect_db
        from flows.cluster import free_port
        from flows.prefect_api import _LazyServer
        import os
        home = os.environ["PREFECT_HOME"]
        for i in range(2):
            before = prefect_db.at_schema(home)
            server = _LazyServer(free_port())
            t = time.perf_counter()
            server.start(120)
            r = httpx.post(server.api_url + "/flow_runs/filter", json={"limit": 1})
            print(i, before, prefect_db.at_schema(home), r.status_code, r.json())
            server.stop()
            time.sleep(1.0)  # the first server lets go of the database
    """)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_API_DATABASE") and k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[-2:]
    assert first == "0 False True 200 []"  # migrated a new database, then recorded it
    assert second == "1 True True 200 []"  # started without the check; the tables are there
