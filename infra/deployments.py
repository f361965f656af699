"""Prefect deployments of the scheduled flows: defined once, served or deployed.

Three deployments, their schedules from the settings (``MTAG_*_CRON``, ``MTAG_TIMEZONE``):

* ``scheduled-ingest/nightly-catalogue-ingest`` (``flows/scheduled.py:scheduled_ingest``):
  02:00 daily;
* ``scheduled-retrain/weekly-retrain`` (``flows/scheduled.py:scheduled_retrain``): 04:00 on
  Sundays;
* ``scheduled-score/score-new-tracks`` (``flows/scheduled.py:scheduled_score``): 06:00 daily.

The ingestion also queues the scoring deployment as soon as it has processed new tracks.
:func:`deploy` registers them against the configured Prefect server (``PREFECT_API_URL``) in a
``process`` work pool (created if missing) whose worker (``prefect worker start --pool
mtag-process``) runs them from this checkout; :func:`serve` runs them in the calling process
instead (no work pool, no worker). Schedules only fire against a real server, not Prefect's
temporary local API.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.settings import Settings, SettingsError, load

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Spec:
    """One deployment: its flow, name, schedule setting and description."""

    flow_name: str
    name: str
    entrypoint: str
    cron_setting: str
    description: str

    @property
    def full_name(self) -> str:
        """``flow-name/deployment-name`` as Prefect names it."""
        return f"{self.flow_name}/{self.name}"


SPECS = (
    Spec("scheduled-ingest", "nightly-catalogue-ingest", "flows/scheduled.py:scheduled_ingest",
         "ingest_cron", "Ingest new and changed files of MTAG_SOURCE into MTAG_STORE, then "
         "queue scoring."),
    Spec("scheduled-retrain", "weekly-retrain", "flows/scheduled.py:scheduled_retrain",
         "train_cron", "Retrain MTAG_MODEL_NAME on MTAG_LABELS; @champion moves only if the "
         "candidate wins on the same test tracks."),
    Spec("scheduled-score", "score-new-tracks", "flows/scheduled.py:scheduled_score",
         "score_cron", "Score tracks the champion has not scored yet; refresh neighbours."),
)


def schedule_of(spec: Spec, settings: Settings, overrides: dict[str, Any] | None = None
                ) -> Any:
    """The spec's schedule: an override (seconds for an interval, or a cron string) or the
    cron setting, in the settings' time zone."""
    from prefect.schedules import Cron, Interval

    value = (overrides or {}).get(spec.name, getattr(settings, spec.cron_setting))
    if isinstance(value, (int, float, dt.timedelta)):
        seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
        return Interval(dt.timedelta(seconds=seconds), timezone=settings.timezone)
    return Cron(str(value), timezone=settings.timezone)


def _flow(spec: Spec) -> Any:
    import importlib

    module, _, attr = spec.entrypoint.partition(":")
    return getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attr)


def ensure_work_pool(name: str) -> None:
    """Create a ``process`` work pool named ``name`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy(settings: Settings | None = None, *, overrides: dict[str, Any] | None = None,
           work_pool: str | None = None) -> dict[str, str]:
    """Register every deployment with the Prefect server; return ``full name -> id``.

    Raises
    ------
    SettingsError
        Without ``PREFECT_API_URL`` (schedules would never fire on a temporary API).
    """
    from prefect import flow as prefect_flow
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise SettingsError("`mtag deploy` needs a Prefect server: set PREFECT_API_URL "
                            "(`mtag stack up` starts one on 127.0.0.1)")
    settings = settings or load()
    pool = work_pool or settings.work_pool
    ensure_work_pool(pool)
    out = {}
    for spec in SPECS:
        source: Any = prefect_flow.from_source(source=str(REPO),  # sync outside a flow
                                               entrypoint=spec.entrypoint)
        deployment_id = source.deploy(
            name=spec.name, work_pool_name=pool, schedule=schedule_of(spec, settings, overrides),
            description=spec.description, tags=["mtag"], build=False, push=False,
            print_next_steps=False, ignore_warnings=True)
        out[spec.full_name] = str(deployment_id)
    return out


def runner_deployments(settings: Settings | None = None,
                       overrides: dict[str, Any] | None = None) -> list[Any]:
    """The deployments as ``RunnerDeployment`` objects for :func:`prefect.serve`."""
    settings = settings or load()
    return [_flow(spec).to_deployment(name=spec.name,
                                      schedule=schedule_of(spec, settings, overrides),
                                      description=spec.description, tags=["mtag"])
            for spec in SPECS]


def serve(settings: Settings | None = None, *, overrides: dict[str, Any] | None = None
          ) -> None:
    """Serve every deployment from this process until interrupted (needs a Prefect server)."""
    from prefect import serve as prefect_serve
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise SettingsError("serving schedules needs a Prefect server: set PREFECT_API_URL")
    prefect_serve(*runner_deployments(settings, overrides), print_starting_message=True)


if __name__ == "__main__":  # python -m infra.deployments [--serve]
    import sys

    from flows.settings import apply_defaults

    apply_defaults()
    if "--serve" in sys.argv:
        serve()
    else:
        for full_name, ident in deploy().items():
            print(f"{full_name}: {ident}")
