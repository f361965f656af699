"""Every MLflow call of the project: tracking URI, runs, params, metrics, artifacts, the model,
the registry and its aliases.

Embedded default: a SQLite tracking store ``STORE/mlflow/mlflow.db`` with artifacts under
``STORE/mlflow/artifacts``. With ``MLFLOW_TRACKING_URI`` set, that server (or store) is used.
One experiment per registered model name. Scoring loads ``models:/NAME@champion``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from featurestore.store import FeatureStore
from tasks.errors import StoreError
from training import local_registry

CANDIDATE, CHAMPION = "candidate", "champion"


def configure(store: FeatureStore) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the store's embedded SQLite; return it.

    Raises
    ------
    StoreError
        For an object-store store without ``MLFLOW_TRACKING_URI``
        (:func:`training.local_registry.store_uri`).
    """
    uri = local_registry.store_uri(store)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def use(uri: str) -> None:
    """Point MLflow (tracking and registry) at ``uri`` in this process (e.g. a Dask worker)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def resolve(model_uri: str) -> dict[str, str]:
    """The registered version behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Returns
    -------
    dict
        ``name``, ``version`` and ``run_id``; scoring uses the exact version, so an alias that
        moves mid-run cannot mix two models in one output.

    Raises
    ------
    StoreError
        If the URI is not a registry URI or names no registered version.
    """
    split = local_registry.split_model_uri(model_uri)
    if split is None:
        raise StoreError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    name, alias, version = split
    client = MlflowClient()
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version is not None:
            mv = client.get_model_version(name, version)
        else:
            raise StoreError(f"{model_uri!r} names no version or alias "
                             "(models:/NAME@ALIAS or models:/NAME/VERSION)")
    except MlflowException as exc:
        raise StoreError(f"no registered model version for {model_uri}: "
                         f"{exc.message.splitlines()[0]}") from exc
    return {"name": mv.name, "version": str(mv.version), "run_id": str(mv.run_id or "")}


def experiment(store: FeatureStore, name: str) -> str:
    """Id of the experiment for registered model ``name`` (created if missing).

    Artifacts of a new experiment go under ``STORE/mlflow/artifacts/NAME`` (a folder, or the
    object store the store is on) when MLflow is a database; an MLflow server keeps its own
    artifact store (``--artifacts-destination``).
    """
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if not mlflow.get_tracking_uri().startswith(("http://", "https://", "databricks")):
        location = store.uri(f"{store.mlflow_dir()}/artifacts/{name}")
        if store.is_local:
            location = "file://" + location
    return str(mlflow.create_experiment(name, artifact_location=location))


@contextmanager
def parent_run(experiment_id: str, run_name: str, tags: dict[str, str] | None = None
               ) -> Iterator[str]:
    """Run of one training invocation in ``experiment_id``; yields its run id.

    The candidates' runs (:func:`child_run`) nest under it; it ends with the block (failed if
    the block raises).
    """
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        yield str(run.info.run_id)


@contextmanager
def child_run(run_name: str) -> Iterator[str]:
    """Run nested under the active run and in its experiment; yields its run id."""
    parent = mlflow.active_run()
    # a nested run does not inherit its parent's experiment: without this it would land in
    # MLflow's "Default" experiment, with artifacts under the working directory
    with mlflow.start_run(run_name=run_name, nested=True,
                          experiment_id=parent.info.experiment_id if parent else None) as run:
        yield str(run.info.run_id)


def log_params(params: dict[str, Any]) -> None:
    """Log params (values as strings, lists as JSON)."""
    flat = {k: (json.dumps(v) if isinstance(v, (list, dict, tuple)) else v)
            for k, v in params.items()}
    mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log finite numeric metrics."""
    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and np.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_report(rep: dict[str, Any], prefix: str, text: str | None = None) -> None:
    """Log a report's headline numbers as metrics and the whole report as JSON (and text)."""
    log_metrics({f"{prefix}_{k}": v for k, v in rep.items()
                 if k in ("accuracy", "macro_f1", "weighted_f1", "macro_precision",
                          "macro_recall", "weighted_precision", "weighted_recall", "roc_auc",
                          "pr_auc", "ece")})
    mlflow.log_dict(rep, f"reports/{prefix}.json")
    if text:
        mlflow.log_text(text, f"reports/{prefix}.txt")


def log_document(document: dict[str, Any], path: str) -> None:
    """Log a JSON document to the active run."""
    mlflow.log_dict(document, path)


def log_file(path: str, folder: str | None = None) -> None:
    """Log a local file as an artifact."""
    mlflow.log_artifact(path, folder)


def log_model(artifact_dir: str, meta: dict[str, Any], example: Any) -> str:
    """Log the tagger as a pyfunc model with signature and input example; return its URI.

    An ensemble of mixed inputs (``meta['input']`` ``"mixed"``) takes a dict of a frame and
    tensors, which no MLflow schema describes: its signature has no input schema (the
    output and params are still enforced) and no input example.
    """
    import sklearn
    import torch

    from training.pyfunc import TaggerPyfunc

    n = len(meta["classes"])
    params = ParamSchema([ParamSpec("output", "string", "probabilities")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, n))])
    inputs: Schema | None
    if meta["input"] == "mixed":
        inputs = None
    elif meta["input"] == "summary":
        keys = [ColSpec("string", "track_id"), ColSpec("integer", "segment")] \
            if meta.get("pooling") == "track" else []
        inputs = Schema([*keys, *(ColSpec("float", c) for c in meta["columns"])])
    else:
        rows, frames = meta["shape"]
        inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, rows, frames))])
    with warnings.catch_warnings():
        if example is None:  # a mixed-input ensemble: no example can be stored (see above)
            warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=TaggerPyfunc(), artifacts={"artifact": artifact_dir},
            signature=ModelSignature(inputs=inputs, outputs=outputs, params=params),
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"scikit-learn=={sklearn.__version__}",
                              f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"],
        )
    return str(info.model_uri)


def annotate_run(run_id: str, *, metrics: dict[str, float], tags: dict[str, str],
                 document: tuple[str, dict[str, Any]]) -> None:
    """Add metrics, tags and a JSON document to a finished run."""
    client = MlflowClient()
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and np.isfinite(value):
            client.log_metric(run_id, key, float(value))
    for key, tag in tags.items():
        client.set_tag(run_id, key, tag)
    client.log_dict(run_id, document[1], document[0])


def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register a model version, tag it, set alias ``candidate``; return the version."""
    version = mlflow.register_model(model_uri, name, tags=tags).version
    MlflowClient().set_registered_model_alias(name, CANDIDATE, version)
    return str(version)


def alias_version(name: str, alias: str) -> Any | None:
    """The model version behind ``name@alias``, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    """Point ``name@alias`` at ``version``."""
    MlflowClient().set_registered_model_alias(name, alias, version)


def load_artifact_dir(model_uri: str) -> str:
    """Download a registered model's tagger artifact folder into a new temporary folder;
    return the local path (:func:`remove_artifact_dir` removes the download).
    """
    target = tempfile.mkdtemp(prefix=local_registry.DOWNLOAD_PREFIX)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=target)
    except BaseException:  # no such model, alias or version: nothing may stay behind
        shutil.rmtree(target, ignore_errors=True)
        raise
    return os.path.join(local, *local_registry.TAGGER_DIR)


remove_artifact_dir = local_registry.remove_artifact_dir


def load_pyfunc(model_uri: str) -> Any:
    """``mlflow.pyfunc.load_model`` of ``model_uri``."""
    return mlflow.pyfunc.load_model(model_uri)
