"""The whole pipeline on ``s3://`` against an S3-compatible server (moto) on 127.0.0.1:
ingest, train (MLflow artifacts on S3), score, neighbours, similar and SQL; credentials come
from the environment and are written nowhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from factories import write, write_labels

from tasks.synth import render_track

pytestmark = pytest.mark.slow

SECRET = "not-a-real-secret-5f1d0c"


@pytest.fixture
def s3(moto_endpoint):
    """The session's moto S3 server (tests/conftest.py)."""
    return moto_endpoint


def test_pipeline_on_s3(s3, tmp_path, monkeypatch):
    import boto3

    env = {"AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    client.create_bucket(Bucket="catalogue")
    client.create_bucket(Bucket="mtag")
    rows = []
    for i in range(9):  # the catalogue itself is on S3 too
        inst = ("piano", "flute", "trumpet")[i % 3]
        local = write(str(tmp_path / "audio" / f"{inst} {i}.flac"), render_track(
            inst, "march", seconds=4.0, sample_rate=22050, seed=500 + i), 22050)
        client.upload_file(local, "catalogue", f"music/{inst}/{inst} {i}.flac")
        rows.append({"path": f"s3://catalogue/music/{inst}/{inst} {i}.flac", "label": inst})
    labels = write_labels(tmp_path / "labels.csv", rows)

    from featurestore.query import connect, run_query
    from featurestore.store import FeatureStore
    from flows.cluster import dask_cluster
    from flows.ingest import run_ingest
    from flows.neighbours import run_neighbours, similar
    from flows.score import run_score
    from flows.train import train_flow

    store = "s3://mtag/store"
    with dask_cluster(None, n_workers=2) as cluster:  # workers get this env
        summary = run_ingest("s3://catalogue/music/", store, dask_address=cluster.address,
                             progress=False)
        assert summary.ok == 9 and summary.failed == 0
        again = run_ingest("s3://catalogue/music/", store, dask_address=cluster.address,
                           progress=False)
        assert again.unchanged == 9 and again.ok == 0
        out = train_flow(store=store, labels=str(labels), model="linear",
                          registered_name="s3-tagger", valid_size=0.2, test_size=0.3)
        assert out.promotion["promoted"]
        scored = run_score(store, "models:/s3-tagger@champion", dask_address=cluster.address,
                           progress=False)
        assert scored.tracks == 9
        nb = run_neighbours(store, k=3, dask_address=cluster.address, progress=False)
        assert nb.tracks == 9 and not nb.skipped
    found, info = similar(store, rows[0]["path"], k=3)
    assert len(found) == 3 and info["path"] == rows[0]["path"]

    con = connect(FeatureStore(store))
    counts = run_query(con, "SELECT (SELECT count(*) FROM tracks) AS t, (SELECT count(*) "
                            "FROM scores) AS s, (SELECT count(*) FROM neighbours) AS n, "
                            "(SELECT count(*) FROM segments) AS g").to_pylist()[0]
    assert counts["t"] == 9 and counts["s"] == 9 and counts["n"] == 27 and counts["g"] >= 9
    con.close()

    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket="mtag") for o in page.get("Contents", [])]
    assert any(k.startswith("store/features/") and "/tensors/" in k and k.endswith(".arrow")
               for k in keys)
    assert any(k.startswith("store/features/") and "/tracks/_delta_log/" in k for k in keys)
    assert any(k.startswith("store/scores/s3-tagger/v1/scores/_delta_log/") for k in keys)
    assert any(k.startswith("store/mlflow/artifacts/s3-tagger/") for k in keys)  # MLflow
    assert not any(k.startswith("store/_staging/") for k in keys)
    assert not os.path.exists("store") and not os.path.exists("mlruns")
    # the secret is in the environment only: no object, no MLflow row holds it
    for key in keys:
        body = client.get_object(Bucket="mtag", Key=key)["Body"].read()
        assert SECRET.encode() not in body, key
    with open(tmp_path / "mlflow.db", "rb") as fh:
        assert SECRET.encode() not in fh.read()


def test_two_writers_on_one_s3_store_keep_every_track_once(s3, tmp_path, dask_address):
    """Two hosts' ingests of one catalogue into one s3:// store at once (two processes with
    their own Dask clusters, conditional writes for the lease and the Delta log)."""
    import boto3

    env = dict(os.environ) | {"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "key",
                              "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=s3, aws_access_key_id="key",
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    client.create_bucket(Bucket="race")
    for i in range(8):
        local = write(str(tmp_path / f"t{i}.wav"), render_track(
            "piano", "ballad", seconds=4.0, sample_rate=22050, seed=700 + i), 22050)
        client.upload_file(local, "race", f"music/t{i}.wav")
    cmd = [sys.executable, "-m", "flows.cli", "ingest", "s3://race/music/", "--store",
           "s3://race/store", "--workers", "1", "--shard-minutes", "0.05", "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]

    from featurestore.query import connect, run_query
    from featurestore.store import FeatureStore

    old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                          "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({k: env[k] for k in old})
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        con = connect(FeatureStore("s3://race/store"))
        counts = run_query(con, "SELECT (SELECT count(*) FROM tracks) AS t, (SELECT "
                                "count(DISTINCT track_id) FROM tracks) AS ids, (SELECT "
                                "count(*) FROM segments) AS s, (SELECT count(*) FROM (SELECT "
                                "DISTINCT track_id, segment FROM segments)) AS keys"
                           ).to_pylist()[0]
        con.close()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert counts["t"] == counts["ids"] == 8
    assert counts["s"] == counts["keys"] >= 8
