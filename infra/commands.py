"""The ``mtag stack`` and ``mtag deploy`` commands, plugged into the CLI through the
``mtag.commands`` entry points (see ``pyproject.toml``), so the flows never import ``infra``.

Each ``register_*`` function adds one sub-command to the parser :mod:`flows.cli` builds.
"""

from __future__ import annotations

import argparse
from typing import Any

from flows.cli import STORE_HELP


def register_stack(sub: Any) -> None:
    """Add ``mtag stack up|down|status|env``."""
    p = sub.add_parser("stack", help="local Prefect, MLflow and Dask servers on 127.0.0.1")
    p.add_argument("action", choices=("up", "down", "status", "env"))
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--workers", type=int, help="Dask worker processes (default 2)")
    p.add_argument("--prefect-port", type=int, help="default 4200 (any free port if taken)")
    p.add_argument("--mlflow-port", type=int, help="default 5000 (any free port if taken)")
    p.add_argument("--dask-port", type=int, help="default 8786 (any free port if taken)")
    p.add_argument("--mlflow-backend-uri", help="e.g. postgresql://... (default: SQLite in "
                   "the store)")
    p.add_argument("--schedules", action="store_true",
                   help="also serve the scheduled deployments from a process")
    p.set_defaults(func=cmd_stack)


def register_deploy(sub: Any) -> None:
    """Add ``mtag deploy``."""
    p = sub.add_parser("deploy", help="register the scheduled deployments with Prefect")
    p.add_argument("--serve", action="store_true",
                   help="serve them from this process instead of a work pool")
    p.add_argument("--work-pool", help="process work pool (default $MTAG_WORK_POOL)")
    p.set_defaults(func=cmd_deploy)


def cmd_stack(args: argparse.Namespace) -> int:
    # the CLI is the one place outside infra/ that reaches into it: environment wiring
    from infra import stack

    if args.action == "up":
        record = stack.up(args.store, workers=args.workers or 2,
                          ports={k: v for k, v in (("prefect", args.prefect_port),
                                                   ("mlflow", args.mlflow_port),
                                                   ("dask", args.dask_port)) if v},
                          mlflow_backend_uri=args.mlflow_backend_uri, schedules=args.schedules)
        print(f"stack for {args.store} is up (state: {record['state_dir']})")
    if args.action in ("up", "status"):
        rows = stack.status(args.store)
        if not rows:
            print(f"no stack recorded for {args.store}")
            return 1
        for r in rows:
            state = "healthy" if r["healthy"] else ("running" if r["running"] else "stopped")
            print(f"  {r['service']:15s} pid {r['pid']:<8d} {state:8s} {r['ui'] or r['url']}")
        if args.action == "up":
            print("point commands at it with:  eval \"$(mtag stack env --store "
                  f"{args.store})\"")
        return 0 if all(r["healthy"] for r in rows) else 1
    if args.action == "env":
        print(stack.env_lines(args.store))
        return 0
    stopped = stack.down(args.store)
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from infra import deployments

    if args.serve:
        deployments.serve()
        return 0
    for name, ident in deployments.deploy(work_pool=args.work_pool).items():
        print(f"deployed {name} ({ident})")
    from flows.settings import load

    pool = args.work_pool or load().work_pool
    print(f"start a worker to run them:  prefect worker start --pool {pool}")
    return 0
