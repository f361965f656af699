"""End to end through the ``mtag`` command: ingest, query formats, kill -9 and resume."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from factories import music_like, tone, write

pytestmark = pytest.mark.slow


def mtag(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"mtag {args} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


def test_ingest_and_query_from_the_command_line(tmp_path):
    cat, store = tmp_path / "my music", tmp_path / "store"
    write(str(cat / "a" / "one.wav"), music_like(7.0, 44100, seed=1), 44100)
    write(str(cat / "b" / "twö.flac"), tone(440, 4.0, 48000, noise=0.01), 48000)
    (cat / "b" / "readme.txt").write_text("liner notes")
    out = mtag("ingest", str(cat), "--store", str(store), "--workers", "2", "--json")
    assert "2 ok, 0 failed, 1 unsupported" in out.stdout
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["ok"] == 2 and summary["segments"] == 3 + 2

    table = mtag("query", "--store", str(store),
                 "SELECT status, count(*) AS n FROM tracks GROUP BY 1 ORDER BY 1").stdout
    assert "ok" in table and "unsupported" in table and "(2 rows)" in table
    as_csv = mtag("query", "--store", str(store), "--format", "csv",
                  "SELECT track_id, segment FROM segments ORDER BY 1, 2").stdout
    parsed = list(csv.DictReader(io.StringIO(as_csv)))
    assert len(parsed) == 5 and set(parsed[0]) == {"track_id", "segment"}
    as_json = json.loads(mtag("query", "--store", str(store), "--format", "json",
                              "SELECT count(*) AS n FROM segments").stdout)
    assert as_json == [{"n": 5}]
    target = tmp_path / "out.parquet"
    mtag("query", "--store", str(store), "--output", str(target), "SELECT * FROM segments")
    import duckdb
    assert duckdb.sql(f"SELECT count(*) FROM '{target}'").fetchall() == [(5,)]

    again = mtag("ingest", str(cat), "--store", str(store), "--workers", "2")
    assert "Nothing to do" in again.stdout

    bad = mtag("query", "--store", str(store), "SELECT * FROM nope", check=False)
    assert bad.returncode == 2 and "query failed" in bad.stderr
    missing = mtag("ingest", str(tmp_path / "absent"), "--store", str(store), check=False)
    assert missing.returncode == 2 and "source not found" in missing.stderr


def test_kill_9_then_resume_gives_exactly_one_row_per_segment(tmp_path):
    cat, store = tmp_path / "cat", tmp_path / "store"
    n_tracks = 24
    for i in range(n_tracks):
        write(str(cat / f"t{i:02d}.wav"), music_like(15.0, 22050, seed=i), 22050)
    cmd = [sys.executable, "-m", "flows.cli", "ingest", str(cat), "--store", str(store),
           "--workers", "2", "--shard-minutes", "0.5", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    commits = store / "features"
    deadline = time.time() + 300
    while time.time() < deadline and not list(commits.glob("*/tracks/*.parquet")):
        assert proc.poll() is None, "ingest ended before it could be killed"
        time.sleep(0.02)
    time.sleep(1.0)  # a shard is written: kill mid-run, around its commit
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its whole process group, mid-flight
    proc.wait()

    out = mtag("ingest", str(cat), "--store", str(store), "--workers", "2",
               "--shard-minutes", "0.5")
    assert "skipped" in out.stdout
    counts = json.loads(mtag(
        "query", "--store", str(store), "--format", "json",
        "SELECT (SELECT count(*) FROM tracks) AS tracks, (SELECT count(DISTINCT track_id) "
        "FROM tracks) AS distinct_tracks, (SELECT count(*) FROM segments) AS segments, "
        "(SELECT count(*) FROM (SELECT DISTINCT track_id, segment FROM segments)) AS keys"
    ).stdout)[0]
    assert counts == {"tracks": n_tracks, "distinct_tracks": n_tracks,
                      "segments": n_tracks * 5, "keys": n_tracks * 5}
    named = json.loads(mtag(  # every tensors file the rows name is there
        "query", "--store", str(store), "--format", "json",
        "SELECT DISTINCT t.feature_set AS fs, s.tensor_file AS f FROM segments s "
        "JOIN tracks t USING (track_id)").stdout)
    assert named and all((store / "features" / r["fs"] / r["f"]).is_file() for r in named)


def test_train_score_similar_neighbours_from_the_command_line(labelled_store, tmp_path):
    import shutil

    src, labels, _ = labelled_store
    store = str(tmp_path / "store")
    shutil.copytree(src, store, ignore=shutil.ignore_patterns("mlflow", "scores",
                                                              "neighbours"))
    mtag("train", "--store", store, "--labels", labels, "--model", "linear",
         "--registered-name", "cli-tagger", "--workdir", str(tmp_path / "work"))
    out = mtag("score", "--store", store, "--model-uri", "models:/cli-tagger@champion",
               "--workers", "2", "--no-progress", "--json").stdout
    assert "Scored 48 tracks" in out and "cli-tagger v1" in out
    summary = json.loads(out[out.index("{"):])
    assert summary["tracks"] == 48 and summary["model_version"] == "1"
    assert "Nothing to do" in mtag("score", "--store", store, "--model-uri",
                                   "models:/cli-tagger/1", "--workers", "2").stdout

    path = json.loads(mtag("query", "--store", store, "--format", "json",
                           "SELECT path FROM scores ORDER BY track_id LIMIT 1").stdout)[0]["path"]
    similar = json.loads(mtag("similar", path, "--store", store, "--k", "3",
                              "--format", "json").stdout)
    assert [r["rank"] for r in similar] == [1, 2, 3] and path not in {r["path"] for r in similar}
    assert similar[0]["similarity"] >= similar[-1]["similarity"]
    out = mtag("neighbours", "--store", store, "--k", "3", "--workers", "2").stdout
    assert "48 tracks x 3 (exact search)" in out
    counts = json.loads(mtag("query", "--store", store, "--format", "json",
                             "SELECT (SELECT count(*) FROM neighbours) AS pairs, (SELECT "
                             "sum(n) FROM (SELECT count(*) AS n FROM scores GROUP BY label)) "
                             "AS tagged").stdout)[0]
    assert counts == {"pairs": 48 * 3, "tagged": 48}

    bad = mtag("score", "--store", store, "--model-uri", "models:/nope@champion", check=False)
    assert bad.returncode == 2 and "no registered model version" in bad.stderr
