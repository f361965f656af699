"""The ``train_flow`` flow: prepare → fit candidates → evaluate → register → promote.

Each fit is an MLflow run (nested under one parent run per invocation) in the experiment named
after the registered model. The best candidate on validation macro-F1 is registered and gets
alias ``candidate``; alias ``champion`` moves only if the candidate beats the current champion
on the same evaluation split (the candidate's test tracks), and the comparison is logged.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import mlflow
import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.report import publish, run_id
from tasks.errors import StoreError
from tasks.version import CODE_VERSION
from training import tracking
from training.artifact import Predictor
from training.artifact import load as load_artifact
from training.evaluate import confusion_png, curves_png, render_report
from training.loop import TrainConfig, pick_device
from training.trainer import FitOutput, Prepared, evaluate_split, fit_candidate, prepare

DEFAULT_NAME = "mtag-tagger"
SMALL_DATA_TRACKS = 300


CPU_AUTO_PARAMS: dict[str, dict[str, Any]] = {
    "short_chunk_resnet": {"channels": 32, "embed_dim": 256}}
"""Sizes ``--model auto`` uses without a GPU: the short-chunk ResNet at a quarter of its
paper width trained in 9 minutes on 3,724 philharmonia notes on 2 cores and was the best
model there (docs/training-results.md); at full width it takes hours."""


def auto_candidates(n_tracks: int, *, accelerated: bool = False) -> list[str]:
    """Models ``--model auto`` tries: cheap ones always; from 300 tracks the short-chunk
    ResNet (CPU-sized without a GPU, see :data:`CPU_AUTO_PARAMS`) and, on a GPU, the CRNN
    (the slowest on CPU: 27 minutes on philharmonia; ``--model crnn`` still asks for it).
    """
    base = ["linear", "gbm", "mfcc_cnn", "cnn"]
    if n_tracks < SMALL_DATA_TRACKS:
        return base
    return [*base, "crnn", "short_chunk_resnet"] if accelerated else [
        *base, "short_chunk_resnet"]


def auto_params(model: str, *, accelerated: bool) -> dict[str, Any] | None:
    """Model config overrides ``--model auto`` uses for ``model`` (None: its defaults)."""
    return None if accelerated else CPU_AUTO_PARAMS.get(model)


@task(name="prepare-labels", cache_policy=NO_CACHE)
def prepare_task(store: str, labels: str, group_column: str | None, valid_size: float,
                 test_size: float, seed: int) -> Prepared:
    return prepare(store, labels, group_column=group_column, valid_size=valid_size,
                   test_size=test_size, seed=seed)


@task(name="fit-model", cache_policy=NO_CACHE, task_run_name="fit-{model}")
def fit_task(prep: Prepared, model: str, workdir: str, train_config: TrainConfig,
             model_params: dict[str, Any] | None, name: str) -> dict[str, Any]:
    parent = mlflow.active_run()
    # a nested run does not inherit its parent's experiment: without this it would land in
    # MLflow's "Default" experiment, with artifacts under the working directory
    with mlflow.start_run(run_name=model, nested=True, experiment_id=parent.info.experiment_id
                          if parent else None) as run:
        tracking.log_params({
            "model": model, "feature_set": prep.feature_set, "label_set": prep.labels.digest,
            "classes": prep.labels.classes, "multi_label": prep.labels.multi_label,
            "split": prep.split_counts(), "seed": train_config.seed,
            "code_version": CODE_VERSION,
        })
        out = fit_candidate(prep, model, workdir, train_config=train_config,
                            model_params=model_params,
                            on_epoch=lambda epoch, m: tracking.log_metrics(
                                {f"epoch_{k}": v for k, v in m.items()}, step=epoch))
        tracking.log_params({k: v for k, v in out.params.items() if k != "model"})
        _log_outputs(out, prep)
        uri = tracking.log_model(out.artifact_dir, out.predictor.meta, _example(out, prep))
        return {"model": model, "run_id": run.info.run_id, "model_uri": uri,
                "valid_macro_f1": out.valid.get("macro_f1", float("nan")),
                "test": out.test_track, "artifact_dir": out.artifact_dir,
                "segments_per_s": out.segments_per_s, "train_seconds": out.train_seconds,
                "data_wait_share": out.data_wait_share, "registered_name": name}


@task(name="register-and-promote", cache_policy=NO_CACHE)
def promote_task(prep: Prepared, best: dict[str, Any], name: str) -> dict[str, Any]:
    """Register ``best``, set ``candidate``, and move ``champion`` if it wins."""
    logger = get_run_logger()
    version = tracking.register(best["model_uri"], name, {
        "feature_set": prep.feature_set, "label_set": prep.labels.digest,
        "model": best["model"]})
    cand_f1 = float(best["test"].get("macro_f1", float("nan")))
    champion = tracking.alias_version(name, tracking.CHAMPION)
    decision: dict[str, Any] = {"version": version, "candidate_test_macro_f1": cand_f1}
    if champion is None:
        decision |= {"promoted": True, "reason": "no champion yet"}
    else:
        champ = load_artifact(tracking.load_artifact_dir(f"models:/{name}/{champion.version}"))
        if champ.meta["feature_set"] != prep.feature_set:
            decision |= {"promoted": True, "champion_version": champion.version,
                         "reason": f"champion v{champion.version} uses feature set "
                                   f"{champ.meta['feature_set']}, not {prep.feature_set}"}
        else:
            _, champ_track = evaluate_split(champ, prep, "test")
            champ_f1 = float(champ_track.get("macro_f1", float("nan")))
            wins = bool(np.isfinite(cand_f1) and (not np.isfinite(champ_f1) or
                                                 cand_f1 > champ_f1))
            decision |= {"promoted": wins, "champion_version": champion.version,
                         "champion_test_macro_f1": champ_f1,
                         "reason": ("candidate beats champion" if wins else
                                    "champion is at least as good") +
                         f" on the same {champ_track['n']} test tracks"}
    if decision["promoted"]:
        tracking.set_alias(name, tracking.CHAMPION, version)
    tracking.annotate_run(
        best["run_id"],
        metrics={k: v for k, v in decision.items() if k.endswith("macro_f1")},
        tags={"promotion": "promoted" if decision["promoted"] else "not promoted",
              "promotion_reason": decision["reason"]},
        document=("promotion.json", decision))
    logger.info("promotion: %s", decision)
    return decision


@flow(name="train-model", validate_parameters=False)
def train_flow(store: str, labels: str, model: str = "auto", registered_name: str | None = None,
                group_column: str | None = None, valid_size: float = 0.15,
                test_size: float = 0.15, train_config: dict[str, Any] | None = None,
                model_params: dict[str, Any] | None = None, workdir: str | None = None
                ) -> dict[str, Any]:
    """Train, evaluate, register and promote; return a summary dict."""
    from featurestore.store import FeatureStore

    name = registered_name or DEFAULT_NAME
    tc = TrainConfig(**(train_config or {}))
    prep = prepare_task(store, labels, group_column, valid_size, test_size, tc.seed)
    print(prep.labels.report())
    print(f"split (tracks): {prep.split_counts()}")
    tracking.configure(FeatureStore(store))
    exp = tracking.experiment(prep.store, name)
    accelerated = pick_device(tc.device).type != "cpu"
    candidates = auto_candidates(len(prep.labels.frame), accelerated=accelerated) \
        if model == "auto" else [model]
    work = workdir or tempfile.mkdtemp(prefix="mtag-train-")
    results = []
    flow_run = run_id()
    get_run_logger().info("flow run %s: training %s on %s", flow_run, model, store)
    with mlflow.start_run(experiment_id=exp, run_name=f"train-{model}",
                          tags={"prefect_flow_run_id": flow_run} if flow_run else None
                          ) as parent:
        for cand in candidates:
            print(f"training {cand} ...")
            params = model_params if model != "auto" else auto_params(
                cand, accelerated=accelerated)
            res = fit_task(prep, cand, work, tc, params, name)
            print(f"  {cand}: valid macro-F1 {res['valid_macro_f1']:.4f}, test accuracy "
                  f"{res['test']['accuracy']:.4f}, macro-F1 {res['test']['macro_f1']:.4f}")
            results.append(res)
        best = max(results, key=lambda r: (np.nan_to_num(r["valid_macro_f1"], nan=-1.0),
                                           -candidates.index(r["model"])))
        tracking.log_params({"best_model": best["model"], "candidates": candidates})
        decision = promote_task(prep, best, name)
        parent_id = parent.info.run_id
    publish("train-summary", f"train {name}: {best['model']} v{decision['version']}", {
        "registered model": f"{name} v{decision['version']} (@candidate)",
        "promotion": ("promoted to @champion" if decision["promoted"] else
                      "champion unchanged") + f": {decision['reason']}",
        "best model": best["model"], "labelled tracks": len(prep.labels.frame),
        "test accuracy": best["test"].get("accuracy"), "test macro-F1":
        best["test"].get("macro_f1"), "MLflow run": parent_id},
        [{"model": r["model"], "valid macro-F1": r["valid_macro_f1"],
          "test accuracy": r["test"].get("accuracy"), "test macro-F1":
          r["test"].get("macro_f1"), "train s": r["train_seconds"]} for r in results])
    return {"registered_name": name, "best": best, "candidates": results,
            "promotion": decision, "parent_run_id": parent_id,
            "labels": {"tracks": len(prep.labels.frame), "unmatched": len(prep.labels.unmatched),
                       "failed": len(prep.labels.failed)}}


def evaluate_model(store: str, labels: str, model_uri: str, *, split: str | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any], Predictor]:
    """Track- and segment-level reports of a registered model on a labelled store."""
    from featurestore.store import FeatureStore

    fstore = FeatureStore(store)
    tracking.configure(fstore)
    predictor = load_artifact(tracking.load_artifact_dir(model_uri))
    fs = predictor.meta["feature_set"]
    if fs not in {r["feature_set"] for r in fstore.feature_sets()}:
        raise StoreError(f"model {model_uri} was trained on feature set {fs}, which store "
                         f"{store} does not have; ingest with that feature config first")
    prep = prepare(store, labels, feature_set=fs, test_size=0.5, valid_size=0.0)
    if split is None:
        prep.splits[:] = "test"  # every labelled track
    seg, track = evaluate_split(predictor, prep, "test")
    return track, seg, predictor


# ----------------------------------------------------------------------------------------
def _log_outputs(out: FitOutput, prep: Prepared) -> None:
    classes = prep.labels.classes
    with tempfile.TemporaryDirectory() as tmp:
        for key, rep in (("valid_track", out.valid), ("test_track", out.test_track),
                         ("test_segment", out.test_segment)):
            tracking.log_report(rep, key, render_report(rep, key) if rep.get("n") else None)
        if "confusion" in out.test_track:
            path = os.path.join(tmp, "confusion_test_track.png")
            confusion_png(out.test_track, classes, path, f"{out.model}: test tracks")
            tracking.log_file(path, "plots")
        if out.history:
            path = os.path.join(tmp, "training_curves.png")
            curves_png(out.history, path)
            tracking.log_file(path, "plots")
        path = os.path.join(tmp, "label_map.json")
        with open(path, "w") as fh:
            json.dump({"classes": classes, "multi_label": prep.labels.multi_label,
                       "threshold": out.predictor.meta.get("threshold")}, fh, indent=1)
        tracking.log_file(path)
    tracking.log_metrics({"train_seconds": out.train_seconds,
                          "train_segments_per_s": out.segments_per_s,
                          "data_wait_share": out.data_wait_share,
                          "threshold": float(out.predictor.meta.get("threshold", 0.0))})


def _example(out: FitOutput, prep: Prepared) -> Any:
    if out.predictor.input == "summary":
        table, columns = prep.summary
        return table[columns].head(2)
    return np.stack([prep.reader.matrix(out.predictor.input, 0)]).astype(np.float32)
