"""Run visibility: the Prefect artifact every flow run publishes, and run ids in logs.

:func:`publish` turns a flow's summary into a Markdown artifact attached to the current flow
run (tracks processed and failed, throughput, model metrics, promotion decision...), so the
Prefect UI shows what each scheduled run did without reading its logs. :func:`run_id` is the
current flow run's id, which the flows log at start and tag their MLflow runs with.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("mtag")


def run_id() -> str | None:
    """Id of the Prefect flow run in progress (None outside one)."""
    from prefect.runtime import flow_run

    value = flow_run.get_id()
    return str(value) if value else None


def markdown(title: str, facts: Mapping[str, Any],
             table: list[Mapping[str, Any]] | None = None) -> str:
    """A Markdown summary: a two-column table of ``facts``, then an optional row table."""
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in facts.items()]
    if table:
        cols = list(table[0])
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def publish(key: str, title: str, facts: Mapping[str, Any],
            table: list[Mapping[str, Any]] | None = None) -> str | None:
    """Attach a Markdown artifact to the current flow run; return its id.

    ``key`` names the artifact across runs (lower-case letters, digits and dashes), so the UI
    shows its history. Failure to publish is logged, never raised: a summary must not fail a
    run that did its work.
    """
    if not re.fullmatch(r"[a-z0-9-]+", key):
        raise ValueError(f"artifact key must be lower-case letters, digits and dashes: {key!r}")
    try:
        from prefect.artifacts import create_markdown_artifact

        return str(create_markdown_artifact(markdown=markdown(title, facts, table), key=key,
                                            description=title))
    except Exception as exc:  # pragma: no cover - visibility only
        log.warning("could not publish the %s artifact: %s", key, exc)
        return None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")
