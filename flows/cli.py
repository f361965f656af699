"""The ``mtag`` command line: ``ingest``, ``query``, ``train``, ``evaluate``, ``score``,
``similar``, ``neighbours``, ``settings``, ``demo``, and the commands that plug in through the
``mtag.commands`` entry points (``stack`` and ``deploy``, from :mod:`infra.commands`: the
environment wiring depends on the flows, never the other way round).

Arguments are parsed here and turned into config objects; the work is done by the flows. This
module (with the demo's script, :mod:`flows.demo`) is the only place in ``flows/`` that prints.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from flows.settings import apply_defaults

if TYPE_CHECKING:
    from tasks.config import FeatureConfig


def _feature_config(args: argparse.Namespace) -> FeatureConfig:
    from tasks.config import FeatureConfig

    data: dict = {}
    if args.feature_config:
        import yaml

        with open(args.feature_config) as fh:
            data = yaml.safe_load(fh) or {}
    for key in ("sample_rate", "segment_s", "segment_hop_s"):
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    return FeatureConfig.from_dict(data)


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.headstart import run_ingest
    from flows.preflight import summary_json

    summary = run_ingest(
        args.source, args.store, config=_feature_config(args), dask_address=args.dask_address,
        n_workers=args.workers, shard_minutes=args.shard_minutes, progress=not args.no_progress,
        echo=print, accept_removals=args.accept_removals,
    )
    print(summary.render())
    if args.json:
        print(summary_json(summary))
    return 1 if summary.shards_failed else 0


def cmd_query(args: argparse.Namespace) -> int:
    from featurestore.query import connect, format_result, run_query, write_result
    from featurestore.store import FeatureStore

    store = FeatureStore(args.store)
    con = connect(store, args.feature_set, args.model, read_only=not args.allow_writes)
    table = run_query(con, args.sql, allow_writes=args.allow_writes)
    if args.output:
        write_result(table, args.output)
        print(f"wrote {table.num_rows} rows to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(format_result(table, args.format, max_rows=args.max_rows))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from flows.score_preflight import start_score, summary_json

    # the model resolved and the work known before Prefect or Dask is imported: a score with
    # nothing to do, or a model that does not exist, answers without either
    start = start_score(args.store, args.model_uri, source=args.source,
                        tracking_uri=args.tracking_uri)
    if start.done is not None:
        summary = start.done
    else:
        from flows.score_preflight import score_preload
        from flows.startup import boot_early

        # work is certain: the API and the workers' fork server boot while Prefect imports
        boot_early(score_preload(args.source, start.model.input),
                   local_cluster=args.dask_address is None)
        from flows.score import run_score

        summary = run_score(
            args.store, args.model_uri, source=args.source, top_k=args.top_k,
            dask_address=args.dask_address, n_workers=args.workers, device=args.device,
            tracking_uri=args.tracking_uri, progress=not args.no_progress, echo=print,
            start=start)
    if summary.ingest is not None:
        print(summary.ingest.render())
    print(summary.render())
    if args.json:
        print(summary_json(summary))
    return 1 if summary.parts_failed else 0


def cmd_similar(args: argparse.Namespace) -> int:
    from featurestore.query import format_result
    from flows.neighbours import similar

    found, info = similar(args.store, args.track, k=args.k, model=args.model)
    if args.format == "table":
        print(f"tracks most like {info['track_id']} ({info['label']}; {info['path']}) by "
              f"{info['model']}, {info['method']} search over {info['tracks']} tracks:")
    import pyarrow as pa

    sys.stdout.write(format_result(pa.Table.from_pandas(found, preserve_index=False),
                                   args.format, max_rows=args.k))
    return 0


def cmd_neighbours(args: argparse.Namespace) -> int:
    from flows.neighbours import run_neighbours

    out = run_neighbours(args.store, k=args.k, model=args.model, method=args.method,
                         dask_address=args.dask_address, n_workers=args.workers,
                         progress=not args.no_progress, force=args.force, echo=print)
    print(out.render())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    return run_demo(args.dir, n_tracks=args.tracks, workers=args.workers,
                    progress=not args.no_progress, train=not args.no_train)


def cmd_train(args: argparse.Namespace) -> int:
    from tasks.errors import ParameterError
    from training.labels import TAG_SOURCE, read_labels, tag_source

    if args.labels_from_tag:
        args.labels = f"{TAG_SOURCE}{args.labels_from_tag}"
        tag_source(args.labels)
    else:  # before Prefect, torch and MLflow load
        read_labels(args.labels, group_column=args.group_column)
    from flows.train import model_label, run_train
    from training.evaluate import render_report

    train_config = {k: v for k, v in {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "max_steps": args.max_steps, "device": args.device,
        "specaugment": args.specaugment or None, "mixup_alpha": args.mixup,
        "crop_frames": args.crop_frames, "patience": args.patience,
        "balance": args.balance or None,
    }.items() if v is not None}
    try:
        params = json.loads(args.model_params) if args.model_params else None
    except json.JSONDecodeError as exc:
        raise ParameterError(f"--model-params is not JSON ({exc}); pass an object such as "
                             "'{\"channels\": 64}'") from exc
    candidates = None if args.candidates is None else [
        c.strip() for c in args.candidates.split(",") if c.strip()]
    summary = run_train(args.store, args.labels, model=args.model,
                        registered_name=args.registered_name, group_column=args.group_column,
                        valid_size=args.valid_size, test_size=args.test_size,
                        train_config=train_config, model_params=params, workdir=args.workdir,
                        as_of=args.as_of, quiet=not args.verbose, candidates=candidates,
                        ensemble_size=args.ensemble_size)
    best, promo = summary.best, summary.promotion
    print(summary.render())
    chosen_on = (f"CV macro-F1 {best['cv']['mean']:.4f} ± {best['cv']['std']:.4f}"
                 if best.get("cv") else f"valid macro-F1 {best['valid_macro_f1']:.4f}")
    print(f"\nbest: {model_label(best)} ({chosen_on}); registered "
          f"{summary.registered_name} v{promo['version']} as @candidate; "
          f"{'promoted to @champion' if promo['promoted'] else 'champion unchanged'} "
          f"({promo['reason']})")
    print(render_report(best["test"], f"test tracks ({best['model']})"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.labels import read_labels

    read_labels(args.labels)  # a bad file fails before Prefect, torch and MLflow load
    from flows.train import evaluate_model
    from training.evaluate import render_report

    track, seg, _ = evaluate_model(args.store, args.labels, args.model_uri)
    if args.format == "json":
        keys = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall",
                "per_class", "n", "roc_auc", "pr_auc", "confusion")
        print(json.dumps({k: track[k] for k in keys if k in track} |
                         {"segment": {k: seg[k] for k in ("accuracy", "macro_f1", "n")}},
                         indent=1))
    else:
        print(render_report(track, f"{args.model_uri}: tracks"))
        print(render_report(seg, f"{args.model_uri}: segments").splitlines()[0])
    return 0


COMMANDS_GROUP = "mtag.commands"
"""Entry-point group of commands other packages add: ``name = "module:register"``, where
``register(subparsers)`` adds the command's parser."""
STORE_HELP = "feature store root, a folder or s3://bucket/prefix (default: $MTAG_STORE)"


def cmd_compact(args: argparse.Namespace) -> int:
    from featurestore.maintenance import compact
    from featurestore.store import FeatureStore

    report = compact(FeatureStore(args.store), retention_hours=args.retention_hours)
    print(report.render())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from featurestore.store import FeatureStore
    from featurestore.verify import repair, verify

    store = FeatureStore(args.store)
    if args.repair:
        fixed = repair(store)
        print(fixed.render())
        return 1 if fixed.problems_left else 0
    report = verify(store)
    print(report.render())
    return 0 if report.ok else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from featurestore.migrate import migrate

    report = migrate(args.store, progress=None if args.no_progress else print)
    print(report.render())
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from flows.settings import load, settings_table

    load()  # validates the environment and the MTAG_CONFIG file
    print(settings_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtag", description="Music catalogue pipeline: ingest, query, train, evaluate, "
        "score, similar, neighbours, demo.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
    parser.add_argument("--config", help="YAML file of MTAG_* settings (sets MTAG_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="ingest a catalogue into a feature store")
    p.add_argument("source", help="folder, fsspec URL prefix (s3://...), or CSV/Parquet manifest")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--dask-address", help="tcp://HOST:PORT of an existing Dask scheduler")
    p.add_argument("--workers", type=int, help="local worker processes (default: cores)")
    p.add_argument("--shard-minutes", type=float, default=60.0,
                   help="audio minutes per shard task (default 60)")
    p.add_argument("--feature-config", help="YAML file of FeatureConfig fields")
    p.add_argument("--sample-rate", type=int, dest="sample_rate")
    p.add_argument("--segment-s", type=float, dest="segment_s")
    p.add_argument("--segment-hop-s", type=float, dest="segment_hop_s")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.add_argument("--accept-removals", action="store_true",
                   help="retire missing files' tracks even if most of the source is missing")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("query", help="run SQL over the store's views")
    p.add_argument("sql")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--feature-set", help="feature set of the views (default: newest)")
    p.add_argument("--model", help="scored model of the score views: NAME or NAME/VERSION "
                   "(default: the most recently scored)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--output", help="write to FILE (.csv, .json or .parquet)")
    p.add_argument("--max-rows", type=int, default=100, help="rows shown as a table")
    p.add_argument("--allow-writes", action="store_true",
                   help="let the SQL read or write files outside the store, attach databases "
                   "and install extensions (off: read-only, confined to the store)")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("train", help="train a tagger on labelled tracks; register in MLflow")
    p.add_argument("--store", help=STORE_HELP)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="CSV/Parquet: path|track_id, label[, split]")
    source.add_argument("--labels-from-tag", metavar="TAG",
                        help="labels from the files' own tags, e.g. genre (with "
                             "--group-column artist: one artist never on both split sides)")
    p.add_argument("--model", default="auto",
                   help="cnn, mfcc_cnn, crnn, short_chunk_resnet, transformer, linear, gbm, "
                   "ensemble (of auto's best few) or auto")
    p.add_argument("--candidates", metavar="NAMES",
                   help="with --model auto: the models to try, comma-separated, e.g. "
                   "linear,gbm,mfcc_cnn,ensemble (ensemble: the mean of the best of the others)")
    p.add_argument("--ensemble-size", type=int, default=3, metavar="N",
                   help="models an ensemble averages (default 3, at least 2)")
    p.add_argument("--registered-name", help="MLflow registered model (default mtag-tagger)")
    p.add_argument("--group-column", help="keep each group (e.g. artist) on one split side")
    p.add_argument("--valid-size", type=float, default=0.15)
    p.add_argument("--test-size", type=float, default=0.15)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--patience", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--specaugment", action="store_true")
    p.add_argument("--balance", action="store_true",
                   help="weight the loss by inverse class frequency (helps rare classes)")
    p.add_argument("--mixup", type=float, help="mixup alpha (0 = off)")
    p.add_argument("--crop-frames", type=int, help="random crops of this many frames")
    p.add_argument("--model-params", help='JSON of model config fields, e.g. {"channels": 64}')
    p.add_argument("--workdir", help="checkpoints and artifacts, kept so that a run with the "
                   "same folder resumes (default: a temporary folder, removed at the end)")
    p.add_argument("--as-of", help="rebuild a past training set: a tracks table version "
                   "(see the run's table_versions param) or an ISO timestamp")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a registered model on a labelled store")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--labels", required=True)
    p.add_argument("--model-uri", required=True, help="models:/NAME@ALIAS or models:/NAME/V")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="tag a catalogue: labels, probabilities, embeddings")
    p.add_argument("source", nargs="?", help="audio to ingest first (folder, URL prefix or "
                   "manifest); only what the store lacks is processed")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--model-uri", required=True, help="models:/NAME@ALIAS or models:/NAME/V")
    p.add_argument("--top-k", type=int, default=5, help="labels kept per track (default 5)")
    p.add_argument("--tracking-uri", help="MLflow URI, or the folder of the store the model "
                   "was trained in (default: MLFLOW_TRACKING_URI, else this store's)")
    p.add_argument("--device", help="torch device of the workers (default: cuda if present)")
    p.add_argument("--dask-address", help="tcp://HOST:PORT of an existing Dask scheduler")
    p.add_argument("--workers", type=int, help="local worker processes (default: cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("similar", help="the tracks that sound most like one track")
    p.add_argument("track", help="track id, or a path/URI of an ingested file")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", help="scored model: NAME or NAME/VERSION (default: latest)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("neighbours", help="write the k nearest tracks of every track")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", help="scored model: NAME or NAME/VERSION (default: latest)")
    p.add_argument("--method", choices=("auto", "exact", "ann"), default="auto",
                   help="exact search, HNSW index, or auto by catalogue size")
    p.add_argument("--force", action="store_true", help="recompute even if current")
    p.add_argument("--dask-address")
    p.add_argument("--workers", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_neighbours)

    p = sub.add_parser("compact", help="compact, checkpoint and vacuum the store's tables")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--retention-hours", type=float, default=168.0,
                   help="never delete files younger than this (default 168: a week)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("verify", help="check every committed file and the tables against "
                       "each other; exit 1 if anything is wrong")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--repair", action="store_true",
                   help="quarantine damaged files; their tracks are ingested again next run")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("migrate", help="turn a store of an older format into Delta tables "
                       "(no audio is decoded again)")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("settings", help="every setting, its default and current value")
    p.set_defaults(func=cmd_settings)

    for plugin in entry_points(group=COMMANDS_GROUP):  # stack, deploy: see infra/commands.py
        plugin.load()(sub)

    p = sub.add_parser("demo", help="generate a demo catalogue, ingest it, query it")
    p.add_argument("--dir", default="demo", help="folder for the catalogue and the store")
    p.add_argument("--tracks", type=int, default=120)
    p.add_argument("--no-train", action="store_true", help="stop after ingest and queries")
    p.add_argument("--workers", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _from_settings(args: argparse.Namespace) -> None:
    """Fill --store, --dask-address and --workers from the settings when not given."""
    from flows.settings import check_url, export_worker_settings, load

    settings = load()
    export_worker_settings(settings)
    if hasattr(args, "store"):
        args.store = check_url(args.store) if args.store else settings.require("store")
    if getattr(args, "dask_address", None) is None and hasattr(args, "dask_address"):
        args.dask_address = settings.dask_address
    if getattr(args, "workers", None) is None and hasattr(args, "workers"):
        args.workers = settings.workers


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        os.environ["MTAG_CONFIG"] = args.config
    apply_defaults(quiet=not args.verbose)
    if args.verbose:  # the project's own log lines (the head start's, the preflight's) too
        import logging

        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | "
                                               "%(name)s - %(message)s", "%H:%M:%S"))
        logger = logging.getLogger("mtag")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Prefect's logging set-up gives the root logger a handler too
    from tasks.errors import MtagError

    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: every `with` cleans up
    try:
        _from_settings(args)
        return int(args.func(args))
    except MtagError as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"mtag: error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print("mtag: interrupted: what was committed stays committed; run the command again "
              "to finish", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` comes from Ctrl-C or SIGTERM: inside a flow run Prefect turns SIGTERM
    into its own ``TerminationSignal``, which can surface wrapped in another error.
    """
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TerminationSignal" \
                or "TerminationSignal" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def entry() -> None:
    """The ``mtag`` console script: :func:`main` with the start-up and exit of
    :mod:`flows.startup` (its exit skips the interpreter's tear-down, about 1.2 s).
    """
    from flows.startup import exit_now, starting

    starting()
    exit_now(main())


if __name__ == "__main__":
    entry()

__all__ = ["build_parser", "entry", "main"]
