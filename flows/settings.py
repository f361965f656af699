"""Settings: one table of every setting, read from the environment and an optional YAML file.

Two kinds of settings live here:

* **the project's own** (:data:`SETTINGS`, environment variables ``MTAG_*``, or the same keys
  in lower case in the YAML file named by ``MTAG_CONFIG``): where the store and the catalogue
  are, which cluster to use, schedules, the registered model name. The environment wins over
  the YAML file, which wins over the defaults. :func:`load` returns them as a frozen
  :class:`Settings`.
* **the libraries'** (:data:`EXTERNAL`: ``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``, the
  ``AWS_*`` variables of the S3 client...): read by Prefect, MLflow, s3fs and boto themselves;
  listed so that one table documents everything an operator can set.

Secrets (credentials) come from the environment only: a YAML file that names one is refused,
a store URL with credentials in it is refused, and :meth:`Settings.public` and
:func:`settings_table` mask them, so they are never printed, logged, or written into Parquet or
MLflow. :func:`apply_defaults` sets the embedded defaults (before Prefect, Dask or MLflow are
imported): Prefect's temporary local API, a Dask ``LocalCluster``, MLflow on SQLite.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tasks.errors import ParameterError

EMBEDDED_DEFAULTS = {
    # the ephemeral API's first database set-up can take ~30 s on a fresh PREFECT_HOME
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # analytics on the ephemeral API logged "database is locked" with several workers
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # tqdm bars for every small artifact download drown the command's own progress
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # (Dask's nanny already gives worker processes OMP/MKL/OPENBLAS_NUM_THREADS=1; the flow
    # process keeps every core for training)
}

QUIET_DEFAULTS = {
    # the command line shows a progress bar and a summary; -v brings the logs back
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
}


@dataclass(frozen=True)
class Setting:
    """One documented setting."""

    env: str
    default: str | None
    help: str
    secret: bool = False

    @property
    def key(self) -> str:
        """Field of :class:`Settings` and key in the YAML file."""
        return self.env.removeprefix("MTAG_").lower()


SETTINGS: tuple[Setting, ...] = (
    Setting("MTAG_STORE", None, "feature store root (folder or s3://bucket/prefix); the "
            "default --store of every command and of the deployments"),
    Setting("MTAG_SOURCE", None, "the catalogue the nightly ingestion reads (folder, URL "
            "prefix or CSV/Parquet manifest)"),
    Setting("MTAG_LABELS", None, "labels file the periodic retraining reads"),
    Setting("MTAG_DASK_ADDRESS", None, "tcp://HOST:PORT of a Dask scheduler; unset: a "
            "LocalCluster per run"),
    Setting("MTAG_WORKERS", None, "worker processes of a local cluster (unset: one per core)"),
    Setting("MTAG_SHARD_MINUTES", "60", "audio minutes per ingest task"),
    Setting("MTAG_MODEL_NAME", "mtag-tagger", "registered model that retraining registers "
            "and scoring loads (@champion)"),
    Setting("MTAG_TRAIN_MODEL", "auto", "model the retraining fits (cnn, short_chunk_resnet, "
            "..., or auto)"),
    Setting("MTAG_INGEST_CRON", "0 2 * * *", "schedule of the nightly ingestion"),
    Setting("MTAG_TRAIN_CRON", "0 4 * * 0", "schedule of the weekly retraining"),
    Setting("MTAG_SCORE_CRON", "0 6 * * *", "schedule of the daily scoring of new tracks"),
    Setting("MTAG_TIMEZONE", "UTC", "time zone of the schedules"),
    Setting("MTAG_WORK_POOL", "mtag-process", "Prefect work pool the deployments run in"),
    Setting("MTAG_NEIGHBOURS_K", "10", "neighbours per track written after scoring"),
    Setting("MTAG_FEATURE_DEVICE", "auto", "where ingest workers compute frame features: "
            "auto (a GPU if present), cpu, cuda or cuda:N"),
    Setting("MTAG_CACHE_DIR", None, "this machine's cache of built filter banks (unset: "
            "$XDG_CACHE_HOME/mtag, else ~/.cache/mtag)"),
    Setting("MTAG_CONFIG", None, "optional YAML file with any of the MTAG_* settings above "
            "(lower-case keys without the prefix)"),
)
"""The project's settings, in documentation order."""

EXTERNAL: tuple[Setting, ...] = (
    Setting("PREFECT_API_URL", None, "Prefect server API (unset: a temporary local API per "
            "run)"),
    Setting("MLFLOW_TRACKING_URI", None, "MLflow tracking server or database (unset: SQLite "
            "inside a local store)"),
    Setting("MLFLOW_TRACKING_USERNAME", None, "MLflow server basic auth user", secret=True),
    Setting("MLFLOW_TRACKING_PASSWORD", None, "MLflow server basic auth password", secret=True),
    Setting("MLFLOW_TRACKING_TOKEN", None, "MLflow server bearer token", secret=True),
    Setting("AWS_ENDPOINT_URL", None, "S3-compatible endpoint (MinIO, Ceph, moto...); unset: "
            "AWS"),
    Setting("AWS_DEFAULT_REGION", None, "S3 region"),
    Setting("AWS_ACCESS_KEY_ID", None, "S3 access key (unset: the AWS credential chain, "
            "e.g. an instance role)", secret=True),
    Setting("AWS_SECRET_ACCESS_KEY", None, "S3 secret key", secret=True),
    Setting("AWS_SESSION_TOKEN", None, "S3 session token", secret=True),
    Setting("MLFLOW_S3_ENDPOINT_URL", None, "endpoint for MLflow's S3 artifacts (default: "
            "AWS_ENDPOINT_URL)"),
)
"""Settings read by the libraries themselves, documented here."""

SECRET_NAMES = frozenset(s.env for s in EXTERNAL if s.secret)


class SettingsError(ParameterError):
    """A setting is missing, malformed, or a secret was put where secrets may not go."""


@dataclass(frozen=True)
class Settings:
    """Resolved project settings (see :data:`SETTINGS` for meaning and defaults)."""

    store: str | None = None
    source: str | None = None
    labels: str | None = None
    dask_address: str | None = None
    workers: int | None = None
    shard_minutes: float = 60.0
    model_name: str = "mtag-tagger"
    train_model: str = "auto"
    ingest_cron: str = "0 2 * * *"
    train_cron: str = "0 4 * * 0"
    score_cron: str = "0 6 * * *"
    timezone: str = "UTC"
    work_pool: str = "mtag-process"
    neighbours_k: int = 10
    feature_device: str = "auto"
    cache_dir: str | None = None
    config: str | None = None

    def require(self, key: str) -> Any:
        """The value of ``key``; a missing one is an error naming its variable."""
        value = getattr(self, key)
        if value in (None, ""):
            raise SettingsError(f"setting {key} is not set: export MTAG_{key.upper()} or "
                                f"put `{key}:` in the MTAG_CONFIG file")
        return value

    def public(self) -> dict[str, Any]:
        """The settings as a dict that is safe to log (no credentials in it)."""
        return {k: redact(v) if isinstance(v, str) else v
                for k, v in dataclasses.asdict(self).items()}


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Resolve the settings: environment, then the YAML file of ``MTAG_CONFIG``, then defaults.

    Raises
    ------
    SettingsError
        On an unknown or secret key in the YAML file, a value of the wrong type, or a store
        URL with credentials in it.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = env.get("MTAG_CONFIG")
    if path:
        values.update(_read_yaml(path))
        values["config"] = path
    for s in SETTINGS:
        if env.get(s.env) not in (None, ""):
            values[s.key] = env[s.env]
    types = {f.name: f.type for f in dataclasses.fields(Settings)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = str(types[key])
        try:
            if value is None:
                out[key] = None
            elif "int" in kind:
                out[key] = int(value)
            elif "float" in kind:
                out[key] = float(value)
            else:
                out[key] = str(value)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"setting {key}: cannot read {value!r} ({exc})") from exc
    settings = Settings(**out)
    if settings.store:
        check_url(settings.store)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", settings.feature_device):
        raise SettingsError(f"setting feature_device: {settings.feature_device!r} is not auto, "
                            f"cpu, cuda or cuda:N")
    return settings


def export_worker_settings(settings: Settings) -> None:
    """Put the settings that worker processes read from their environment there (a value
    from the MTAG_CONFIG file only reaches the workers this way; the environment wins).
    """
    for env, value in (("MTAG_FEATURE_DEVICE", settings.feature_device),
                       ("MTAG_CACHE_DIR", settings.cache_dir)):
        if value not in (None, "") and not os.environ.get(env):
            os.environ[env] = str(value)


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise SettingsError(f"MTAG_CONFIG={path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings")
    keys = {s.key for s in SETTINGS} - {"config"}
    secrets = sorted(k for k in data if str(k).upper() in SECRET_NAMES)
    if secrets:
        raise SettingsError(f"{path} holds secrets {secrets}: secrets come from the "
                            "environment only")
    unknown = sorted(set(data) - keys)
    if unknown:
        raise SettingsError(f"{path}: unknown settings {unknown}; known: {sorted(keys)}")
    return dict(data)


def check_url(url: str) -> str:
    """Refuse a URL that carries credentials (``s3://key:secret@bucket``); return it."""
    if "://" in url and urlsplit(url).password:
        raise SettingsError("credentials in a URL are refused (they would end up in logs "
                            "and lineage columns); pass them in the environment")
    return url


def redact(text: str) -> str:
    """``text`` with any ``user:password@`` of a URL replaced by ``***@``."""
    if "://" not in text:
        return text
    parts = urlsplit(text)
    if not parts.password and not parts.username:
        return text
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def settings_table(env: Mapping[str, str] | None = None) -> str:
    """Markdown table of every setting: variable, default, current value (secrets masked)."""
    env = os.environ if env is None else env
    rows = ["| variable | default | current | what |", "|---|---|---|---|"]
    for s in (*SETTINGS, *EXTERNAL):
        value = env.get(s.env)
        shown = "(set, hidden)" if s.secret and value else (redact(value) if value else "")
        rows.append(f"| `{s.env}` | {f'`{s.default}`' if s.default else ''} | "
                    f"{f'`{shown}`' if shown else ''} | {s.help} |")
    return "\n".join(rows)


def apply_defaults(env: dict[str, str] | None = None, *, quiet: bool = False) -> None:
    """Set each embedded default (and with ``quiet`` the log levels) not already set.

    Also points MLflow's S3 client at ``AWS_ENDPOINT_URL`` when only that is set.
    """
    target = os.environ if env is None else env
    for key, value in (EMBEDDED_DEFAULTS | (QUIET_DEFAULTS if quiet else {})).items():
        target.setdefault(key, value)
    if target.get("AWS_ENDPOINT_URL"):
        target.setdefault("MLFLOW_S3_ENDPOINT_URL", target["AWS_ENDPOINT_URL"])
