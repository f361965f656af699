"""The scheduled flows as deployments run them: parameters from the settings, real cluster,
real Prefect and MLflow; each publishes its summary artifact."""

from __future__ import annotations

import shutil

import pytest

from featurestore.query import connect, run_query
from featurestore.store import FeatureStore

pytestmark = pytest.mark.slow


def artifacts(key):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])))


def test_retrain_then_score_from_settings(labelled_store, tmp_path, monkeypatch, dask_address,
                                          prefect_harness):
    from flows.scheduled import scheduled_ingest, scheduled_retrain, scheduled_score

    src, labels, _ = labelled_store
    store = str(tmp_path / "store")
    shutil.copytree(src, store, ignore=shutil.ignore_patterns("mlflow", "scores",
                                                              "neighbours"))
    for key, value in {"MTAG_STORE": store, "MTAG_LABELS": labels, "MTAG_TRAIN_MODEL":
                       "linear", "MTAG_MODEL_NAME": "sched-tagger", "MTAG_DASK_ADDRESS":
                       dask_address, "MTAG_NEIGHBOURS_K": "3"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    trained = scheduled_retrain()
    assert trained["registered_name"] == "sched-tagger" and trained["promotion"]["promoted"]
    assert trained["best_model"] == "linear"
    again = scheduled_retrain()  # the weekly run: a new candidate, champion kept unless better
    assert again["promotion"]["version"] == "2" and not again["promotion"]["promoted"]

    scored = scheduled_score()
    assert scored.score.tracks == 48 and scored.score.model_version == "1"
    assert scored.neighbours.tracks == 48 and scored.neighbours.k == 3
    con = connect(FeatureStore(store))
    assert run_query(con, "SELECT count(*) AS n FROM neighbours").to_pylist() == [{"n": 144}]
    con.close()
    rescored = scheduled_score()  # nothing new: both steps do nothing
    assert rescored.score.tracks == 0 and rescored.neighbours.skipped

    for key in ("train-summary", "score-summary", "neighbours-summary"):
        assert artifacts(key), key
    texts = [a.data for a in artifacts("train-summary")]  # other tests publish this key too
    assert any("sched-tagger" in t and "promotion" in t for t in texts)

    monkeypatch.setenv("MTAG_SOURCE", src.rsplit("/", 1)[0] + "/catalogue")
    ingested = scheduled_ingest(score_after=False)
    assert ingested.unchanged == 48 and ingested.ok == 0

    # the nightly run verifies the store: a damaged file fails it, naming the fix
    from tasks.errors import StoreError

    fstore = FeatureStore(store)
    victim = fstore.files(fstore.default_feature_set(), "tensors")[0]
    with open(victim, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(StoreError, match=r"mtag verify --store .* --repair"):
        scheduled_ingest(score_after=False, compact_after=False)
