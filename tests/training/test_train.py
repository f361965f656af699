"""Training on a real ingested store, tracked in a real MLflow SQLite store."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from factories import load_registered, model_downloads, temp_entries
from mlflow import MlflowClient

from featurestore.store import FeatureStore
from training import tracking
from training.loop import TrainConfig
from training.trainer import fit_candidate, prepare

pytestmark = pytest.mark.slow

FAST = TrainConfig(epochs=10, batch_size=16, lr=2e-3, patience=10, seed=0)
SMALL = {"short_chunk_resnet": {"channels": 16, "embed_dim": 64},
         "cnn": {"channels": [16, 32, 32, 64]}, "crnn": {"channels": [16, 32, 32], "hidden": 32}}


@pytest.fixture(scope="module")
def prep(labelled_store):
    store, labels, _ = labelled_store
    return prepare(store, labels, valid_size=0.2, test_size=0.2, seed=0)


def test_split_has_no_track_on_both_sides(prep):
    parts = prep.parts("logmel")
    sides = {k: set(v.track_ids) for k, v in parts.items()}
    assert sides["train"] and sides["valid"] and sides["test"]
    assert not (sides["train"] & sides["valid"]) and not (sides["train"] & sides["test"])
    assert not (sides["valid"] & sides["test"])
    assert len(prep.labels.unmatched) == 1  # catalogue/missing.flac


@pytest.mark.parametrize("model", ["linear", "gbm", "mfcc_cnn", "cnn", "crnn",
                                   "short_chunk_resnet"])
def test_each_model_beats_chance(prep, tmp_path, model):
    out = fit_candidate(prep, model, str(tmp_path), train_config=FAST,
                        model_params=SMALL.get(model))
    chance = 1 / len(prep.labels.classes)
    assert out.test_segment["n"] > 10
    assert out.test_segment["accuracy"] > chance + 0.2, out.test_segment
    assert 0.0 <= out.predictor.meta["threshold"] <= 1.0
    probs, emb = out.predictor.predict(
        prep.summary[0][out.predictor.input_columns].head(3) if model in ("linear", "gbm") else
        np.stack([prep.reader.matrix(out.predictor.input, i) for i in range(3)]),
        embeddings=True)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-4)
    assert emb is not None and emb.shape[0] == 3


def test_multi_label(labelled_store, tmp_path):
    store, _, multi = labelled_store
    p = prepare(store, multi, seed=0)
    assert p.labels.multi_label and "winds" in p.labels.classes
    out = fit_candidate(p, "linear", str(tmp_path))
    assert "roc_auc" in out.test_track and "pr_auc" in out.test_track
    probs, _ = out.predictor.predict(p.summary[0][out.predictor.input_columns].head(4))
    assert probs.shape == (4, len(p.labels.classes)) and probs.max() <= 1.0
    assert 0 < out.predictor.meta["temperature"] and "ece" in out.test_track


def test_resume_from_checkpoint_continues(prep, tmp_path):
    cfg = {"channels": [8, 16, 16], "embed_dim": 32}
    per_epoch = -(-len(prep.parts("mfcc")["train"]) // 16)
    # an interrupted run: stops after two of four epochs, leaving its checkpoint
    first = fit_candidate(prep, "mfcc_cnn", str(tmp_path), model_params=cfg,
                train_config=TrainConfig(epochs=4, batch_size=16, patience=99,
                                         max_steps=2 * per_epoch))
    assert [h["epoch"] for h in first.history] == [0, 1]
    resumed = fit_candidate(prep, "mfcc_cnn", str(tmp_path), model_params=cfg,
                  train_config=TrainConfig(epochs=4, batch_size=16, patience=99))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == first.history
    fresh = fit_candidate(prep, "mfcc_cnn", str(tmp_path / "other"), model_params=cfg,
                train_config=TrainConfig(epochs=4, batch_size=16, patience=99))
    from tasks.errors import ParameterError
    with pytest.raises(ParameterError, match="resume with the same epochs"):
        fit_candidate(prep, "mfcc_cnn", str(tmp_path), model_params=cfg,
            train_config=TrainConfig(epochs=6, batch_size=16, patience=99))
    # same seed, same data: resuming reproduces the uninterrupted run's losses
    np.testing.assert_allclose([h["train_loss"] for h in resumed.history],
                               [h["train_loss"] for h in fresh.history], rtol=1e-4)


def test_train_flow_registers_promotes_and_reloads(labelled_store, mlflow_env, tmp_path,
                                                   prefect_harness):
    from flows.train import WORK_PREFIX, evaluate_model, train_flow

    store, labels, _ = labelled_store
    name = f"test-{tmp_path.name}"[:60]
    first = train_flow(store=store, labels=labels, model="linear", registered_name=name,
                        valid_size=0.2, test_size=0.2, workdir=str(tmp_path / "w1"))
    assert first.promotion["promoted"] and first.promotion["version"] == "1"
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "1"
    run = client.get_run(first.best["run_id"])
    # the candidate's run, its artifacts and its logged model live in the model's experiment,
    # inside the store (not in MLflow's Default experiment under the working directory)
    assert run.info.experiment_id == client.get_experiment_by_name(name).experiment_id
    assert run.info.artifact_uri.startswith(f"file://{store}/mlflow/artifacts/{name}/")
    source = client.get_model_version(name, "1").source
    logged = mlflow.get_logged_model(source.removeprefix("models:/"))
    assert logged.artifact_location.startswith(f"file://{store}/mlflow/artifacts/{name}/")
    fs = FeatureStore(store).default_feature_set()
    assert run.data.params["feature_set"] == fs
    assert run.data.params["label_set"].startswith("ls-")
    assert "test_track_macro_f1" in run.data.metrics
    assert run.data.tags["promotion"] == "promoted"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"label_map.json", "plots", "reports", "promotion.json"} <= names
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    # linear: no epochs, no curves; the reliability diagram beside the confusion matrix
    assert plots == {"plots/confusion_test_track.png", "plots/reliability_test_track.png"}
    assert "test_track_ece" in run.data.metrics and "temperature" in run.data.metrics
    assert mlflow.get_tracking_uri().startswith("sqlite:///") and store in \
        mlflow.get_tracking_uri()

    # a weaker candidate (one optimisation step) does not take the champion alias; the
    # champion's download for that comparison, and evaluate's below, are removed, and so is
    # the temporary folder a run without a workdir trains in
    downloads, folders = model_downloads(), temp_entries(WORK_PREFIX)
    second = train_flow(store=store, labels=labels, model="mfcc_cnn", registered_name=name,
                         valid_size=0.2, test_size=0.2,
                         train_config={"epochs": 1, "max_steps": 1, "batch_size": 8},
                         model_params={"channels": [4, 4, 4], "embed_dim": 8})
    assert temp_entries(WORK_PREFIX) == folders
    assert second.best["artifact_dir"] is None and second.best["held_out"] is None
    promo = second.promotion
    assert promo["version"] == "2" and not promo["promoted"], promo
    assert promo["champion_test_macro_f1"] >= promo["candidate_test_macro_f1"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "2"

    # reload from the registry: same predictions as the in-memory model
    prep = prepare(store, labels, valid_size=0.2, test_size=0.2)
    x = prep.summary[0][["track_id", "segment", *prep.summary[1]]].head(5)
    loaded = tracking.load_pyfunc(f"models:/{name}@champion")
    from training.artifact import load
    direct = load(first.best["artifact_dir"]).predict(x)[0]
    np.testing.assert_allclose(loaded.predict(x), direct, rtol=1e-6)
    emb = loaded.predict(x, params={"output": "embedding"})
    assert emb.shape[0] == 5

    track, seg, _ = evaluate_model(store, labels, f"models:/{name}@champion")
    assert track["n"] == 48 and seg["n"] > 48
    assert track["accuracy"] > 0.6
    assert model_downloads() == downloads


def test_auto_chooses_by_cross_validation_and_refits_on_train_and_valid(
        labelled_store, mlflow_env, tmp_path, prefect_harness):
    from flows.train import train_flow

    store, labels, _ = labelled_store
    name = f"cv-{tmp_path.name}"[:60]
    summary = train_flow(store=store, labels=labels, model="auto", registered_name=name,
                         valid_size=0.2, test_size=0.2, workdir=str(tmp_path / "w"),
                         candidates=["linear", "gbm"])
    sel = summary.selection
    assert sel["regime"] == "cv" and sel["folds"] == 5 and sel["repeats"] == 2
    assert [r["model"] for r in sel["table"]] == ["linear", "gbm"]
    for row, cand in zip(sel["table"], summary.candidates, strict=True):
        assert row["n"] == 10 and 0 <= row["std"] and row["se"] == pytest.approx(
            row["std"] / np.sqrt(5))
        assert cand["cv"]["mean"] == pytest.approx(row["mean"]) == cand["valid_macro_f1"]
    assert summary.best["model"] == sel["chosen"]
    assert "CV macro-F1" in summary.render() and "chosen: " in summary.render()
    # the registered model was refitted on train + valid, calibrated on out-of-fold tracks
    pool = summary.split["train"] + summary.split["valid"]
    assert summary.best["train_tracks"] == pool == 39
    version = MlflowClient().get_model_version_by_alias(name, "candidate")
    predictor = load_registered(f"models:/{name}/{version.version}")
    assert predictor.meta["train_tracks"] == pool
    assert predictor.pooled == (summary.best["model"] == "linear")  # gbm: segment rows
    assert predictor.meta["temperature"] == summary.best["calibration"]["temperature"] != 1.0
    assert summary.best["calibration"]["source"] == "cv"
    assert summary.best["calibration"]["tracks"] == pool
    run = MlflowClient().get_run(summary.best["run_id"])
    assert {"cv_macro_f1_mean", "cv_macro_f1_std", "cv_macro_f1_se", "test_track_ece",
            "cv_oof_track_ece"} <= set(run.data.metrics)
    assert summary.best["test"]["n"] == summary.split["test"]
