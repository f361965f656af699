"""Start a Dask cluster on SLURM (dask-jobqueue) for ``mtag ... --dask-address``.

Run it on a login node (where ``sbatch`` works), from the repository root, in the project's
virtual environment, with dask-jobqueue installed there (it is not a dependency of mtag)::

    pip install dask-jobqueue
    python infra/slurm/start_cluster.py --jobs 4 [--queue PARTITION] [--account ACCOUNT]

It starts the Dask scheduler in this process, submits ``--jobs`` worker jobs built from
``infra/slurm/jobqueue.yaml`` (cores, processes, memory, walltime, the prologue that exports the
workers' environment and activates the venv), prints ``MTAG_DASK_ADDRESS=tcp://HOST:PORT`` and
keeps running until interrupted (Ctrl-C or SIGTERM), then cancels the jobs. In another shell::

    export MTAG_DASK_ADDRESS=tcp://HOST:PORT
    mtag ingest /shared/catalogue --store /shared/store --dask-address $MTAG_DASK_ADDRESS

``--print-job-script`` prints the batch script that would be submitted and exits (nothing is
submitted). Nothing in the flows imports this file.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).with_name("jobqueue.yaml")
INSTALL_HINT = ("dask-jobqueue is needed to start a SLURM cluster and is not a dependency of "
                "mtag: install it on the login node, in the project's environment: "
                "pip install dask-jobqueue")


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    """The dask-jobqueue configuration in ``path`` (a mapping with ``jobqueue.slurm``)."""
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    slurm = data.get("jobqueue", {}).get("slurm") if isinstance(data, dict) else None
    if not isinstance(slurm, dict):
        raise SystemExit(f"{path}: expected a dask-jobqueue configuration with jobqueue.slurm")
    return data


def slurm_cluster_class() -> Any:
    """``dask_jobqueue.SLURMCluster``, imported only when a cluster is started."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise SystemExit(f"{INSTALL_HINT} ({exc})") from exc
    return SLURMCluster


def make_cluster(config: str | Path = DEFAULT_CONFIG, **overrides: Any) -> Any:
    """A ``SLURMCluster`` from the configuration file; ``overrides`` win over it."""
    cluster_class = slurm_cluster_class()
    import dask.config

    dask.config.update(dask.config.config, load_config(config), priority="new")
    return cluster_class(**{k: v for k, v in overrides.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="start_cluster.py",
        description="Start a Dask cluster on SLURM and print MTAG_DASK_ADDRESS.")
    parser.add_argument("--jobs", type=int, default=1,
                        help="SLURM jobs to submit (each runs `processes` workers; default 1)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="dask-jobqueue YAML (default: infra/slurm/jobqueue.yaml)")
    parser.add_argument("--queue", help="SLURM partition (overrides the config)")
    parser.add_argument("--account", help="SLURM account (overrides the config)")
    parser.add_argument("--walltime", help="HH:MM:SS per job (overrides the config)")
    parser.add_argument("--address-file",
                        help="also write MTAG_DASK_ADDRESS=... to this file")
    parser.add_argument("--print-job-script", action="store_true",
                        help="print the batch script and exit; submit nothing")
    return parser


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cluster = make_cluster(args.config, queue=args.queue, account=args.account,
                           walltime=args.walltime)
    try:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        line = f"MTAG_DASK_ADDRESS={cluster.scheduler_address}"
        print(line, flush=True)
        if args.address_file:
            Path(args.address_file).write_text(line + "\n")
        print(f"dashboard: {cluster.dashboard_link}; {args.jobs} job(s) submitted; "
              "Ctrl-C stops the cluster and cancels the jobs", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _stop)
        seen = -1
        while True:
            workers = len(cluster.scheduler_info.get("workers", {}))
            if workers != seen:
                print(f"workers connected: {workers}", file=sys.stderr, flush=True)
                seen = workers
            time.sleep(10)
    except KeyboardInterrupt:
        print("stopping: cancelling the jobs", file=sys.stderr, flush=True)
        return 0
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
