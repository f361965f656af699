"""Worker-side bodies of the train tasks: fit one candidate in its MLflow run, ensemble the best
few, register the best one and move the ``champion`` alias only if it wins.

Plain functions (the Prefect wrappers are in :mod:`flows.train`). They connect the trainer
(:mod:`training.trainer`) and its reports and plots (:mod:`training.evaluate`) to MLflow, whose
every call goes through :mod:`training.tracking`.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from tasks.version import CODE_VERSION
from training import tracking
from training.artifact import load as load_artifact
from training.ensemble import ENSEMBLE, Member, fit_ensemble
from training.evaluate import confusion_png, curves_png, reliability_png, render_report
from training.loop import TrainConfig
from training.select import CVResult, cross_validate, refit_split
from training.trainer import MIXED, FitOutput, Prepared, evaluate_split, fit_candidate


def fit_and_log(prep: Prepared, model: str, workdir: str, train_config: TrainConfig,
                model_params: dict[str, Any] | None, name: str,
                folds: list[Any] | None = None) -> dict[str, Any]:
    """Fit ``model`` in a child run of the active run: params, epochs, reports, plots, model.

    With ``folds`` (:func:`training.select.cv_folds`) the candidate is cross-validated over
    train + valid first, then refitted on train + valid (a network for the epoch count CV
    found) and calibrated on its out-of-fold predictions.

    Returns
    -------
    dict
        ``model``, ``run_id``, ``model_uri``, ``valid_macro_f1`` (with ``folds``: the CV
        mean), ``cv`` (with ``folds``: :meth:`training.select.CVResult.summary`), ``test``
        (the test-track report), ``calibration``, ``train_tracks``, ``artifact_dir``,
        ``held_out`` (the ``.npz`` of the held-out predictions it was calibrated on, for an
        ensemble), ``segments_per_s``, ``train_seconds``, ``data_wait_share`` and
        ``registered_name``.
    """
    with tracking.child_run(model) as run_id:
        _log_run_params(prep, model, train_config)

        def on_epoch(epoch: int, m: dict[str, float]) -> None:
            tracking.log_metrics({f"epoch_{k}": v for k, v in m.items()}, step=epoch)

        cv = None
        fit_prep = prep
        if folds:
            cv = cross_validate(prep, model, folds, workdir, train_config=train_config,
                                model_params=model_params)
            _log_cv(cv)
            fit_prep = refit_split(prep)
        out = fit_candidate(fit_prep, model, workdir, train_config=train_config,
                            model_params=model_params, on_epoch=on_epoch,
                            held_out=cv.held_out if cv else None,
                            epochs=cv.epochs if cv else None)
        tracking.log_params({k: v for k, v in out.params.items() if k != "model"}
                            | {"fit_split": fit_prep.split_counts(),
                               "calibrated_on": out.calibration.get("source")})
        _log_outputs(out, fit_prep, heldout_key="cv_oof_track" if cv else "valid_track")
        uri = tracking.log_model(out.artifact_dir, out.predictor.meta, _example(out, prep))
        held = out.held_out.save(os.path.join(workdir, model, "heldout.npz")) \
            if out.held_out is not None else None
        return _result(out, cv, run_id, uri, name) | {"held_out": held}


def ensemble_and_log(prep: Prepared, members: list[dict[str, Any]], workdir: str,
                     train_config: TrainConfig, name: str, folds: list[Any] | None = None
                     ) -> dict[str, Any]:
    """Ensemble fitted candidates (results of :func:`fit_and_log`, best first) in a child run
    of the active run: the members, their weights and scores as params (and tags), the
    ensemble's CV scores (with ``folds``), reports, plots and the model.

    Returns
    -------
    dict
        As :func:`fit_and_log`, with ``members`` (per member ``model``, ``weight``, ``score``
        and ``run_id``).
    """
    with tracking.child_run(ENSEMBLE) as run_id:
        _log_run_params(prep, ENSEMBLE, train_config)
        out, cv = fit_ensemble(prep, [Member(r["model"], r["artifact_dir"], r["held_out"],
                                             float(r["valid_macro_f1"])) for r in members],
                               workdir, folds=folds)
        listed = [{"model": m["model"], "weight": w, "score": m["valid_macro_f1"],
                   "run_id": m["run_id"]}
                  for m, w in zip(members, out.predictor.meta["model_config"]["weights"],
                                  strict=True)]
        names = [m["model"] for m in listed]
        tracking.log_params({"members": names,
                             "member_weights": {m["model"]: m["weight"] for m in listed},
                             "member_scores": {m["model"]: m["score"] for m in listed},
                             "member_run_ids": {m["model"]: m["run_id"] for m in listed},
                             "calibrated_on": out.calibration.get("source")})
        if cv:
            _log_cv(cv)
        fit_prep = refit_split(prep) if folds else prep
        _log_outputs(out, fit_prep, heldout_key="cv_oof_track" if cv else "valid_track")
        tracking.annotate_run(run_id, metrics={}, tags={
            "ensemble.members": ",".join(names),
            **{f"ensemble.member.{m['model']}": f"weight={m['weight']:.4g} "
               f"score={m['score']:.4f} run={m['run_id']}" for m in listed}},
            document=("ensemble.json", {"members": listed}))
        uri = tracking.log_model(out.artifact_dir, out.predictor.meta, _example(out, prep))
        return _result(out, cv, run_id, uri, name) | {"members": listed}


def _log_run_params(prep: Prepared, model: str, train_config: TrainConfig) -> None:
    """Params every candidate's run logs: model, feature and label set, split, lineage."""
    tracking.log_params({
        "model": model, "feature_set": prep.feature_set, "label_set": prep.labels.digest,
        "classes": prep.labels.classes, "multi_label": prep.labels.multi_label,
        "split": prep.split_counts(), "seed": train_config.seed,
        "code_version": CODE_VERSION, "table_versions": prep.versions,
        "label_rows": prep.labels.counts(),  # rows read, tracks kept, dropped per reason
    })


def _result(out: FitOutput, cv: CVResult | None, run_id: str, uri: str, name: str
            ) -> dict[str, Any]:
    """The JSON-ready result of a candidate (see :func:`fit_and_log`)."""
    summary = cv.summary() if cv else None
    return {"model": out.model, "run_id": run_id, "model_uri": uri,
            "valid_macro_f1": summary["mean"] if summary else
            out.valid.get("macro_f1", float("nan")),
            "cv": summary, "test": out.test_track, "calibration": out.calibration,
            "open_set": out.predictor.meta.get("open_set"),
            "train_tracks": out.predictor.meta["train_tracks"],
            "artifact_dir": out.artifact_dir,
            "segments_per_s": out.segments_per_s, "train_seconds": out.train_seconds
            + (cv.seconds if cv else 0.0),
            "data_wait_share": out.data_wait_share, "registered_name": name}


def _log_cv(cv: CVResult) -> None:
    """The fold scores (``step`` = fold), their mean, std and standard error, and a network's
    mean held-out macro-F1 per epoch.
    """
    summary = cv.summary()
    for i, value in enumerate(cv.scores):
        tracking.log_metrics({"cv_fold_macro_f1": value}, step=i)
    for epoch, value in enumerate(cv.curve):
        tracking.log_metrics({"cv_epoch_macro_f1": value}, step=epoch)
    tracking.log_metrics({"cv_macro_f1_mean": summary["mean"],
                          "cv_macro_f1_std": summary["std"], "cv_macro_f1_se": summary["se"],
                          "cv_seconds": cv.seconds}
                         | ({"cv_epochs": float(cv.epochs)} if cv.epochs else {}))
    tracking.log_params({"cv_folds": summary["folds"], "cv_repeats": summary["repeats"]})


def register_and_promote(prep: Prepared, best: dict[str, Any], name: str) -> dict[str, Any]:
    """Register ``best`` (alias ``candidate``) and move ``champion`` to it if it wins.

    The decision is logged to ``best``'s run (metrics, tags and ``promotion.json``).

    Returns
    -------
    dict
        ``version``, ``candidate_test_macro_f1``, ``promoted``, ``reason`` and, when there is
        a champion, ``champion_version`` (and ``champion_test_macro_f1`` when it was compared).
    """
    version = tracking.register(best["model_uri"], name, {
        "feature_set": prep.feature_set, "label_set": prep.labels.digest,
        "model": best["model"], "tracks_version": str(prep.versions.get("tracks")),
        "segments_version": str(prep.versions.get("segments"))})
    cand_f1 = float(best["test"].get("macro_f1", float("nan")))
    decision: dict[str, Any] = {"version": version, "candidate_test_macro_f1": cand_f1}
    decision |= _versus_champion(prep, name, cand_f1)
    if decision["promoted"]:
        tracking.set_alias(name, tracking.CHAMPION, version)
    tracking.annotate_run(
        best["run_id"],
        metrics={k: v for k, v in decision.items() if k.endswith("macro_f1")},
        tags={"promotion": "promoted" if decision["promoted"] else "not promoted",
              "promotion_reason": decision["reason"]},
        document=("promotion.json", decision))
    return decision


def _versus_champion(prep: Prepared, name: str, cand_f1: float) -> dict[str, Any]:
    """Whether a candidate with test macro-F1 ``cand_f1`` takes ``champion``, and why.

    The champion is scored on the same test tracks; one trained on another feature set is
    replaced, since it cannot be compared.
    """
    champion = tracking.alias_version(name, tracking.CHAMPION)
    if champion is None:
        return {"promoted": True, "reason": "no champion yet"}
    directory = tracking.load_artifact_dir(f"models:/{name}/{champion.version}")
    try:
        champ = load_artifact(directory)  # read whole: the download can go at once
    finally:
        tracking.remove_artifact_dir(directory)
    if champ.meta["feature_set"] != prep.feature_set:
        return {"promoted": True, "champion_version": champion.version,
                "reason": f"champion v{champion.version} uses feature set "
                          f"{champ.meta['feature_set']}, not {prep.feature_set}"}
    _, champ_track = evaluate_split(champ, prep, "test")
    champ_f1 = float(champ_track.get("macro_f1", float("nan")))
    wins = bool(np.isfinite(cand_f1) and (not np.isfinite(champ_f1) or cand_f1 > champ_f1))
    return {"promoted": wins, "champion_version": champion.version,
            "champion_test_macro_f1": champ_f1,
            "reason": ("candidate beats champion" if wins else "champion is at least as good")
            + f" on the same {champ_track['n']} test tracks"}


def _log_outputs(out: FitOutput, prep: Prepared, heldout_key: str = "valid_track") -> None:
    """Log the reports, the plots, the label map and the run's timing and calibration
    metrics.
    """
    classes = prep.labels.classes
    with tempfile.TemporaryDirectory() as tmp:
        for key, rep in ((heldout_key, out.valid), ("test_track", out.test_track),
                         ("test_segment", out.test_segment)):
            tracking.log_report(rep, key, render_report(rep, key) if rep.get("n") else None)
        if "confusion" in out.test_track:
            path = os.path.join(tmp, "confusion_test_track.png")
            confusion_png(out.test_track, classes, path, f"{out.model}: test tracks")
            tracking.log_file(path, "plots")
        if "reliability" in out.test_track:
            path = os.path.join(tmp, "reliability_test_track.png")
            reliability_png(out.test_track, path, f"{out.model}: test tracks")
            tracking.log_file(path, "plots")
        if out.history:
            path = os.path.join(tmp, "training_curves.png")
            curves_png(out.history, path)
            tracking.log_file(path, "plots")
        path = os.path.join(tmp, "label_map.json")
        with open(path, "w") as fh:
            json.dump({"classes": classes, "multi_label": prep.labels.multi_label,
                       "threshold": out.predictor.meta.get("threshold"),
                       "open_set": out.predictor.meta.get("open_set"),
                       "temperature": out.predictor.meta.get("temperature")}, fh, indent=1)
        tracking.log_file(path)
    cal = out.calibration
    open_set = out.predictor.meta.get("open_set") or {}
    tracking.log_metrics({f"open_set_{k}": float(open_set[k]) for k in
                          ("threshold", "held_out_known", "test_known", "reference_tracks")
                          if k in open_set})
    tracking.log_metrics({"train_seconds": out.train_seconds,
                          "train_segments_per_s": out.segments_per_s,
                          "data_wait_share": out.data_wait_share,
                          "threshold": float(out.predictor.meta.get("threshold", 0.0)),
                          "temperature": float(out.predictor.meta.get("temperature", 1.0)),
                          "heldout_ece_before": cal.get("ece_before", float("nan")),
                          "heldout_ece_after": cal.get("ece_after", float("nan")),
                          "train_tracks": float(out.predictor.meta.get("train_tracks", 0))})


def _example(out: FitOutput, prep: Prepared) -> Any:
    """Input example logged with the model: two summary rows or one feature matrix (none for
    an ensemble of mixed inputs: MLflow cannot store a dict of a frame and tensors).
    """
    if out.predictor.input == MIXED:
        return None
    if out.predictor.input == "summary":
        table, _ = prep.summary
        first = table["track_id"].iloc[0]  # a pooled model needs a whole track's segments
        return table.loc[table["track_id"] == first, out.predictor.input_columns].head(3)
    return np.stack([prep.reader.matrix(out.predictor.input, 0)]).astype(np.float32)
