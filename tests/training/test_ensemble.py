"""Ensembles of trained candidates: the averaged probabilities, the artifact, the flow, the
registry, scoring and neighbours on a real store, MLflow and Prefect; ``--candidates``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from factories import load_registered
from mlflow import MlflowClient

from featurestore.query import connect, run_query
from featurestore.store import FeatureStore
from tasks.errors import ParameterError
from tasks.predictions import l2_normalize
from training import tracking
from training.artifact import load
from training.calibration import track_probabilities
from training.ensemble import Ensemble, Member, fit_ensemble, pick_members
from training.evaluate import confidence_threshold
from training.select import COST_ORDER, choose
from training.trainer import MIXED, HeldOut, fit_candidate, predict_split, prepare

FAST = {"epochs": 2, "batch_size": 16, "lr": 2e-3, "seed": 0}


def test_members_are_the_best_scores_and_ties_go_to_the_cheaper():
    scores = {"mfcc_cnn": 0.9, "gbm": 0.8, "linear": 0.8, "cnn": float("nan"),
              "crnn": 0.7, "ensemble": 0.99}
    assert pick_members(scores, 3) == ["mfcc_cnn", "linear", "gbm"]
    assert pick_members(scores, 2) == ["mfcc_cnn", "linear"]
    assert pick_members({"linear": 0.5, "gbm": float("nan")}, 3) == ["linear"]
    with pytest.raises(ParameterError, match="at least 2"):
        pick_members(scores, 1)


def test_the_ensemble_wins_only_by_more_than_its_standard_error():
    assert COST_ORDER[-1] == "ensemble"
    assert COST_ORDER.index("transformer") == COST_ORDER.index("cnn") + 1
    single = [0.80, 0.82, 0.78, 0.81, 0.79]  # mean 0.80
    close = [0.76, 0.86, 0.78, 0.86, 0.84]  # mean 0.82, se 0.021: 0.80 is within one se
    got = choose({"ensemble": close, "linear": single}, 5)
    assert got["best"] == "ensemble" and got["chosen"] == "linear"
    clear = [0.84, 0.85, 0.86, 0.85, 0.85]  # mean 0.85, se 0.003
    assert choose({"linear": single, "ensemble": clear}, 5)["chosen"] == "ensemble"


def _mtag_fails(*args):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtag: error: "), proc.stderr
    return lines[0]


@pytest.mark.slow
def test_candidates_flag_errors(tmp_path):
    from flows.train import check_candidates

    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.wav,piano\nb.wav,flute\n")
    base = ["train", "--store", str(tmp_path / "store"), "--labels", str(labels)]
    line = _mtag_fails(*base, "--candidates", "linear, lenear,gbm")
    assert "unknown candidate 'lenear' (--candidates); choose from " in line
    assert "linear" in line and "ensemble" in line
    assert "--candidates needs --model auto (got --model gbm)" in _mtag_fails(
        *base, "--model", "gbm", "--candidates", "linear,gbm")
    # the same checks in-process (each CLI start costs seconds)
    cases = {"unknown candidates 'a', 'b'": ("auto", ["a", "b"], 3),
             "an ensemble averages at least 2 of the other candidates": (
                 "auto", ["linear", "ensemble"], 3),
             "names no model": ("auto", [], 3),
             "names gbm more than once": ("auto", ["gbm", "linear", "gbm"], 3),
             "--ensemble-size 1": ("auto", None, 1),
             "--candidates needs --model auto (got --model ensemble)": (
                 "ensemble", ["linear", "gbm"], 3)}
    for message, (model, candidates, size) in cases.items():
        with pytest.raises(ParameterError, match=re.escape(message)):
            check_candidates(model, candidates, size)
    check_candidates("auto", ["linear", "gbm", "ensemble"], 2)
    check_candidates("ensemble", None, 3)


@pytest.fixture(scope="module")
def prep(labelled_store):
    store, labels, _ = labelled_store
    return prepare(store, labels, valid_size=0.2, test_size=0.2, seed=0)


@pytest.mark.slow
def test_holdout_ensemble_averages_calibrated_members(prep, tmp_path):
    """On the valid split (the regime from 2,000 tracks): probabilities, threshold,
    artifact round trip."""
    outs = [fit_candidate(prep, m, str(tmp_path)) for m in ("linear", "gbm")]
    members = [Member(o.model, o.artifact_dir, o.held_out.save(str(tmp_path / f"{o.model}.npz")),
                      o.valid["macro_f1"]) for o in outs if o.held_out is not None]
    out, cv = fit_ensemble(prep, members, str(tmp_path))
    ens = out.predictor
    assert cv is None and isinstance(ens, Ensemble) and ens.input == "summary"
    assert ens.meta["temperature"] == 1.0 and ens.weights == [0.5, 0.5]
    assert ens.embed_dim == sum(o.predictor.embed_dim for o in outs)
    # probabilities: the mean of the members' calibrated ones (their temperatures differ)
    assert outs[0].predictor.temperature != outs[1].predictor.temperature
    table, _ = prep.summary
    x = table[ens.input_columns]
    probs, emb = ens.predict(x, embeddings=True)
    parts = [o.predictor.predict(x, embeddings=True) for o in outs]
    np.testing.assert_allclose(probs, np.mean([p for p, _ in parts], axis=0), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(emb, np.concatenate([l2_normalize(e) for _, e in parts], 1)
                               / np.sqrt(2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # held-out: the mean of the members' calibrated valid-track probabilities sets the
    # threshold and is the valid report
    valid = [predict_split(o.predictor, prep, "valid", tracks=True) for o in outs]
    mean = np.mean([p for _, p, _ in valid], axis=0)
    assert ens.meta["threshold"] == pytest.approx(
        confidence_threshold(valid[0][2], mean, multi_label=False))
    assert out.valid["n"] == len(mean) and out.calibration["source"] == "valid"
    assert out.test_track["n"] == int((prep.splits == "test").sum())
    # the artifact holds the members; load gives the same predictions
    assert sorted(os.listdir(os.path.join(out.artifact_dir, "members"))) == ["0-linear",
                                                                            "1-gbm"]
    again = load(out.artifact_dir)
    assert isinstance(again, Ensemble) and [m.meta["model"] for m in again.members] == [
        "linear", "gbm"]
    np.testing.assert_allclose(again.predict(x)[0], probs, rtol=1e-6)
    with pytest.raises(ParameterError, match="lacks summary"):
        ens.predict({"mfcc": np.zeros((1, 2, 3), np.float32)})


@pytest.mark.slow
def test_auto_with_an_ensemble_candidate_of_classic_models(labelled_store, mlflow_env,
                                                           tmp_path, prefect_harness):
    from flows.train import train_flow

    store, labels, _ = labelled_store
    name = f"ens-{tmp_path.name}"[:60]
    summary = train_flow(store=store, labels=labels, model="auto", registered_name=name,
                         valid_size=0.2, test_size=0.2, workdir=str(tmp_path / "w"),
                         candidates=["linear", "gbm", "ensemble"], ensemble_size=2)
    sel = summary.selection
    assert [r["model"] for r in sel["table"]] == ["linear", "gbm", "ensemble"]
    ens = next(c for c in summary.candidates if c["model"] == "ensemble")
    singles = {c["model"]: c for c in summary.candidates if c["model"] != "ensemble"}
    assert [m["model"] for m in ens["members"]] == pick_members(
        {m: c["cv"]["mean"] for m, c in singles.items()}, 2)
    # the ensemble's CV: one score per fold of the first repeat, from the members'
    # out-of-fold predictions; the singles' over both repeats
    assert len(ens["cv"]["scores"]) == 5 and ens["cv"]["repeats"] == 1
    assert {len(c["cv"]["scores"]) for c in singles.values()} == {10}
    assert sel["chosen"] == choose({c["model"]: c["cv"]["scores"]
                                    for c in summary.candidates}, 5)["chosen"]
    assert "ensemble (" in summary.render() and ens["calibration"]["source"] == "cv"
    assert ens["train_tracks"] == summary.split["train"] + summary.split["valid"]
    run = MlflowClient().get_run(ens["run_id"])
    assert run.data.params["model"] == "ensemble"
    assert run.data.params["members"] == '["linear", "gbm"]' or \
        run.data.params["members"] == '["gbm", "linear"]'
    assert set(run.data.params) >= {"member_weights", "member_scores", "member_run_ids"}
    assert run.data.tags["ensemble.members"] in ("linear,gbm", "gbm,linear")
    assert {"cv_macro_f1_mean", "test_track_macro_f1", "threshold"} <= set(run.data.metrics)
    assert "ensemble.json" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    # the ensemble's logged model works through mlflow.pyfunc like any summary model
    loaded = mlflow.pyfunc.load_model(ens["model_uri"])
    table, columns = prepare(store, labels, valid_size=0.2, test_size=0.2).summary
    x = table[["track_id", "segment", *columns]].head(6)
    direct = load(ens["artifact_dir"]).predict(x)[0]
    np.testing.assert_allclose(loaded.predict(x), direct, rtol=1e-6)


@pytest.fixture(scope="module")
def mixed(labelled_store, tmp_path_factory, dask_address, prefect_harness):
    """A private copy of the labelled store, ``--model ensemble`` trained and registered in
    it (linear, gbm and a small mfcc_cnn: summary rows and MFCC tensors), and one scoring
    run."""
    from flows.score import run_score
    from flows.train import train_flow

    src, labels, _ = labelled_store
    store = str(tmp_path_factory.mktemp("ensemble") / "store")
    shutil.copytree(src, store, ignore=shutil.ignore_patterns("mlflow"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    summary = train_flow(store=store, labels=labels, model="ensemble", registered_name="ens",
                         valid_size=0.2, test_size=0.2, train_config=FAST,
                         workdir=str(tmp_path_factory.mktemp("work")))
    scored = run_score(store, "models:/ens@champion", dask_address=dask_address,
                       progress=False)
    return store, labels, summary, scored


def _query(store, sql, model=None):
    con = connect(FeatureStore(store), model=model)
    try:
        return run_query(con, sql).to_pandas()
    finally:
        con.close()


@pytest.mark.slow
def test_model_ensemble_of_mixed_inputs_registers_one_model(mixed):
    store, labels, summary, _ = mixed
    best = summary.best
    assert best["model"] == "ensemble" and summary.selection["chosen"] == "ensemble"
    assert summary.selection["rule"] == "--model ensemble"
    assert {m["model"] for m in best["members"]} == {"linear", "gbm", "mfcc_cnn"}
    assert summary.promotion["version"] == "1"
    assert MlflowClient().get_model_version("ens", "1").tags["model"] == "ensemble"
    ens = load_registered("models:/ens@champion", device="cpu")
    assert isinstance(ens, Ensemble) and ens.input == MIXED
    assert set(ens.meta["inputs"]) == {"summary", "mfcc"}
    # the open-set threshold: on the mean of the members' calibrated out-of-fold track
    # probabilities (each member at its own temperature)
    singles = {c["model"]: c for c in summary.candidates}
    held = []
    for m in best["members"]:
        h = HeldOut.load(singles[m["model"]]["held_out"])
        held.append(track_probabilities(h.track_ids, h.scores, load(
            singles[m["model"]]["artifact_dir"]).temperature, multi_label=False))
    assert all(np.array_equal(held[0][0], ids) for ids, _ in held)
    prep = prepare(store, labels, valid_size=0.2, test_size=0.2)
    mean = np.mean([p for _, p in held], axis=0)
    assert ens.meta["threshold"] == pytest.approx(confidence_threshold(
        prep.labels.targets(held[0][0]), mean, multi_label=False))
    # probabilities of one track: the mean of each member's on its own input
    one = prep.labels.frame["track_id"].iloc[0]
    table, columns = prep.summary
    frame = table[table["track_id"] == one][["track_id", "segment", *columns]]
    mfcc = np.stack([prep.reader.matrix("mfcc", int(r)) for r in prep.tensor_rows(
        frame["track_id"].to_numpy(object), frame["segment"].to_numpy())])
    x = {"summary": frame, "mfcc": mfcc}
    probs, emb = ens.predict(x, embeddings=True)
    each = [load(singles[m["model"]]["artifact_dir"], device="cpu").predict(
        frame if m["model"] != "mfcc_cnn" else mfcc)[0] for m in best["members"]]
    np.testing.assert_allclose(probs, np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    assert emb is not None and emb.shape == (len(frame), ens.embed_dim)
    # the registered pyfunc takes the same dict (no input schema) and gives the same
    loaded = tracking.load_pyfunc("models:/ens@champion")
    assert loaded.metadata.signature.inputs is None
    np.testing.assert_allclose(loaded.predict(x), probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.predict(x, params={"output": "embedding"}), emb,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_score_and_neighbours_on_a_mixed_ensemble(mixed, dask_address):
    from flows.neighbours import run_neighbours

    store, labels, _, scored = mixed
    assert scored.tracks == 48 and scored.parts_failed == 0
    tracks = _query(store, "SELECT * FROM scores ORDER BY track_id")
    assert len(tracks) == 48 and set(tracks["model_name"]) == {"ens"}
    ens = load_registered("models:/ens/1", device="cpu")
    emb = np.stack(tracks["embedding"].to_numpy())
    assert emb.shape == (48, ens.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # the ensemble carries the run's open-set detector: confident is its novelty <= 1
    assert ens.novelty is not None and ens.meta["open_set"]["reference_tracks"] > 0
    assert (tracks["confident"] == (tracks["novelty"] <= 1.0)).all()
    # every labelled non-test track is a reference track, so (nearly) all of them are known
    assert tracks["confident"].mean() > 0.8
    # the stored scores are the ensemble's on the stored features, every track
    prep = prepare(store, labels, valid_size=0.2, test_size=0.2)
    ids, probs, _ = predict_split(ens, prep, "test", tracks=True)
    ids_all = tracks["track_id"].to_numpy(object)
    got = np.stack(tracks["probabilities"].to_numpy())[np.searchsorted(ids_all, ids)]
    np.testing.assert_allclose(got, probs, rtol=1e-4, atol=1e-6)
    truth = tracks["path"].str.extract(r"/catalogue/(\w+)/")[0]
    assert (truth == tracks["label"]).mean() > 0.6
    near = run_neighbours(store, k=3, model="ens/1", method="exact",
                          dask_address=dask_address, progress=False)
    assert near.tracks == 48
