#!/usr/bin/env python
"""Scale benchmark of the Delta Lake store: 1M-track stores, queries, no-op runs, increments.

Sub-commands (each prints its figures and writes ``bench/results/scale-<cmd>-<time>.json``):

``store``      (b) a store of N tracks written through the store's own write and commit path
               (``tables.write_data_file`` into the real table folders, then
               ``FeatureStore.commit_shards`` of ``WrittenShard`` groups) from seeded,
               generated feature rows: no audio is decoded and no tensors files are written
               (``tensor_file`` is null). It also creates one real, *sparse* file per track
               (the size a 2 s 16-bit wav would have, no data blocks) so that the no-op run's
               ``discover()`` stats real files, records their ``sources`` rows
               (``FeatureStore.record_sources``) and writes a manifest CSV of their URIs.
``compact``    ``featurestore.maintenance.compact`` (what ``mtag compact`` runs), timed, with
               the file counts of every table before and after.
``queries``    the five analyst queries as a user runs them: whole-process
               ``mtag query --store DIR SQL`` (median of ``--runs``), and in-process
               (``featurestore.query.connect`` + ``run_query``).
``noop``       whole-process ``mtag ingest MANIFEST --store DIR`` with nothing new (median of
               ``--runs``; checks that no Dask cluster was started), and the in-process parts
               of the preflight (``flows.ingest.look_up``: listing, snapshots, triage).
``increment``  N_new (1,000) new tracks into an existing store through the real commit path:
               listing + triage of the catalogue with the new files, writing the new rows,
               ``commit_shards``, ``record_sources``; run it on a big and a small store.
``plan``       (c) ProbeRecords for N tracks in memory, ``plan_shards`` + ``batch_shards``:
               shards, task runs, planning wall; ``--flow`` also runs a Prefect flow of that
               many trivial task runs on a local Dask cluster (orchestration wall).
``real``       (a) a real ingest of N short generated wav tracks (2-4 s, 22,050 Hz), a no-op
               rerun, a 1 % increment and the five queries.

Usage::

    .venv/bin/python bench/scale_bench.py store --store /tmp/s1m --files /tmp/s1m-src \\
        --tracks 1000000 --segments-per-track 1 --shard-tracks 1000
    .venv/bin/python bench/scale_bench.py queries --store /tmp/s1m --label before
    .venv/bin/python bench/scale_bench.py compact --store /tmp/s1m
    .venv/bin/python bench/scale_bench.py noop --store /tmp/s1m --source /tmp/s1m-src/manifest.csv
    .venv/bin/python bench/scale_bench.py increment --store /tmp/s1m \\
        --source /tmp/s1m-src/manifest.csv --files /tmp/s1m-src
    .venv/bin/python bench/scale_bench.py plan --tracks 1000000
    .venv/bin/python bench/scale_bench.py real --tracks 5000 --root /tmp/real5k
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchenv

benchenv.apply_cli_defaults()

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import hashlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

MTAG = os.path.join(benchenv.REPO, ".venv", "bin", "mtag")
PACKAGES = ("mtag", "numpy", "pyarrow", "deltalake", "duckdb", "prefect", "dask",
            "distributed", "pandas")
WAV_BYTES_PER_S = 22050 * 2
WAV_HEADER = 44

QUERIES: dict[str, str] = {
    "count": "SELECT count(*) AS n FROM segments",
    "group_by": "SELECT segment, count(*) AS n, avg(rms_mean) AS rms, "
                "avg(centroid_mean) AS centroid FROM segments GROUP BY segment "
                "ORDER BY segment",
    "join": "SELECT t.format, t.sample_rate, count(*) AS segments, avg(s.mfcc_mean_00) AS m0 "
            "FROM tracks t JOIN segments s USING (track_id) WHERE t.status = 'ok' "
            "GROUP BY ALL ORDER BY segments DESC",
    "point": "SELECT * FROM segments WHERE track_id = '{track_id}'",
    "top_k": "SELECT track_id, segment, centroid_mean FROM segments "
             "ORDER BY centroid_mean DESC LIMIT 10",
}


# ----------------------------------------------------------------------------------------
# helpers
def med(xs: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the runs."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "runs": [round(x, 4) for x in xs]}


def fmt(m: dict[str, float]) -> str:
    return f"{m['median']:8.3f} s  ({m['min']:.3f}-{m['max']:.3f}, n={len(m['runs'])})"


def content_hashes(seed: int, start: int, n: int) -> list[str]:
    """Deterministic 32-hex content hashes of generated tracks ``start .. start+n``."""
    return [hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).hexdigest()
            for i in range(start, start + n)]


def file_path(files_dir: str, i: int) -> str:
    return os.path.join(files_dir, f"p{i // 1000:04d}", f"t{i:07d}.wav")


def make_sparse_files(files_dir: str, start: int, n: int, durations: np.ndarray
                      ) -> tuple[list[str], list[int], list[float]]:
    """Sparse files of a 2-4 s 16-bit mono wav's size (no data written); paths, sizes, mtimes."""
    paths, sizes, mtimes = [], [], []
    for k in range(n):
        i = start + k
        path = file_path(files_dir, i)
        if k == 0 or i % 1000 == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        size = WAV_HEADER + int(durations[k] * WAV_BYTES_PER_S)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
        st = os.fstat(fd)
        os.close(fd)
        paths.append(path)
        sizes.append(size)
        mtimes.append(st.st_mtime)
    return paths, sizes, mtimes


def shard_tables(cfg: Any, fs_id: str, shard_id: str, ids: list[str], hashes: list[str],
                 paths: list[str], sizes: list[int], durations: np.ndarray, seg_per_track: int,
                 rng: np.random.Generator) -> tuple[Any, Any]:
    """``tracks`` and ``segments`` Arrow tables of one generated shard (real schemas)."""
    import pyarrow as pa

    from featurestore.schema import TRACKS_SCHEMA, segments_schema, with_metadata
    from tasks.track import summary_columns

    n = len(ids)
    now = dt.datetime.now(dt.UTC)
    tracks = pa.Table.from_arrays([
        pa.array(ids, pa.string()), pa.array(paths, pa.string()),
        pa.array(["ok"] * n, pa.string()), pa.nulls(n, pa.string()), pa.nulls(n, pa.string()),
        pa.array(durations, pa.float64()), pa.array(np.full(n, 22050, np.int32)),
        pa.array(np.ones(n, np.int32)), pa.array(["WAV"] * n, pa.string()),
        pa.array(hashes, pa.string()), pa.array(np.asarray(sizes, np.int64)),
        pa.array(rng.uniform(-12, -0.1, n)), pa.array(rng.uniform(-30, -8, n)),
        pa.array(np.full(n, seg_per_track, np.int32)),
        pa.array([fs_id] * n, pa.string()), pa.array([shard_id] * n, pa.string()),
        pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        pa.array(rng.uniform(0.01, 0.05, n)), pa.nulls(n, pa.string()),
    ], schema=with_metadata(TRACKS_SCHEMA, cfg))
    m = n * seg_per_track
    seg = np.tile(np.arange(seg_per_track, dtype=np.int32), n)
    n_stats = len(summary_columns(cfg))
    stats = rng.standard_normal((n_stats, m), dtype=np.float32)
    frames = cfg.segment_frames
    cols = [
        pa.array(np.repeat(np.asarray(ids, dtype=object), seg_per_track), pa.string()),
        pa.array(seg), pa.array(seg * cfg.segment_hop_s, pa.float64()),
        pa.array(np.full(m, frames * cfg.frame_seconds)),
        pa.array(np.full(m, frames, np.int32)),
    ] + [pa.array(stats[j]) for j in range(n_stats)] + [
        pa.array([shard_id] * m, pa.string()), pa.nulls(m, pa.string()),
        pa.array(np.arange(m, dtype=np.int64))]
    segments = pa.Table.from_arrays(cols, schema=segments_schema(cfg))
    return tracks, segments


def write_generated(store: Any, cfg: Any, start: int, n: int, *, seg_per_track: int,
                    shard_tracks: int, commit_group: int, seed: int, files_dir: str,
                    record_sources: bool = True, log: bool = True) -> dict[str, Any]:
    """Write tracks ``start .. start+n`` (files, rows, commits, sources); timed parts."""
    from featurestore import tables
    from featurestore.hashing import short_hash
    from featurestore.store import ShardCounts, WrittenShard

    fs_id = store.register_feature_set(cfg)
    rng = np.random.default_rng(seed + start)
    durations = rng.uniform(2.0, 4.0, n)
    t = {"files_s": 0.0, "generate_s": 0.0, "write_s": 0.0, "commit_s": 0.0,
         "commits": [], "sources_s": 0.0}
    hashes = content_hashes(seed, start, n)
    sources: list[dict[str, Any]] = []
    held: list[Any] = []
    started = time.perf_counter()

    def commit() -> None:
        t0 = time.perf_counter()
        result = store.commit_shards(held, run="scale-bench")
        dt_s = time.perf_counter() - t0
        t["commit_s"] += dt_s
        t["commits"].append(round(dt_s, 4))
        assert len(result.committed) == len(held), result
        held.clear()

    for a in range(0, n, shard_tracks):
        b = min(n, a + shard_tracks)
        t0 = time.perf_counter()
        paths, sizes, mtimes = make_sparse_files(files_dir, start + a, b - a, durations[a:b])
        t1 = time.perf_counter()
        ids = [h[:16] for h in hashes[a:b]]
        shard_id = "s-" + short_hash(fs_id, *sorted(ids))
        tr, sg = shard_tables(cfg, fs_id, shard_id, ids, hashes[a:b], paths, sizes,
                              durations[a:b], seg_per_track, rng)
        t2 = time.perf_counter()
        tf = tables.write_data_file(store, store.table_path(fs_id, "tracks"), tr,
                                    prefix=shard_id)
        sf = tables.write_data_file(store, store.table_path(fs_id, "segments"), sg,
                                    prefix=shard_id)
        t3 = time.perf_counter()
        counts = ShardCounts(b - a, b - a, 0, sg.num_rows, float(durations[a:b].sum()), ids)
        held.append(WrittenShard(shard_id, fs_id, counts, tf, sf, None))
        sources += [{"uri": p, "size_bytes": s, "mtime": mt, "content_hash": h,
                     "track_id": h[:16]} for p, s, mt, h in
                    zip(paths, sizes, mtimes, hashes[a:b], strict=True)]
        t["files_s"] += t1 - t0
        t["generate_s"] += t2 - t1
        t["write_s"] += t3 - t2
        if len(held) >= commit_group:
            commit()
        if log and (a // shard_tracks) % 100 == 99:
            print(f"  {b:,} tracks in {time.perf_counter() - started:.0f} s "
                  f"(last commit {t['commits'][-1] if t['commits'] else 0:.2f} s)", flush=True)
    if held:
        commit()
    if record_sources:
        t0 = time.perf_counter()
        store.record_sources(sources)
        t["sources_s"] = time.perf_counter() - t0
    t["total_s"] = time.perf_counter() - started
    t["sources"] = sources
    return t


def table_files(store: Any) -> dict[str, dict[str, int]]:
    """Per table: files in the current snapshot, Parquet files in the folder, log entries."""
    from featurestore import tables
    from featurestore.maintenance import table_paths

    out = {}
    for path in table_paths(store):
        table = tables.open_table(store, path)
        folder = path
        parquet = sum(1 for d, _, fs in os.walk(folder) if "_delta_log" not in d
                      for f in fs if f.endswith(".parquet"))
        log = os.path.join(folder, "_delta_log")
        out[path.removeprefix(store.root).lstrip("/")] = {
            "snapshot_files": len(table.file_uris()), "parquet_on_disk": parquet,
            "log_json": sum(1 for f in os.listdir(log) if f.endswith(".json")),
            "version": int(table.version())}
    return out


def dir_mb(path: str) -> float:
    total = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.stat(os.path.join(d, f)).st_blocks * 512
            except OSError:
                pass
    return total / 2**20


def finish(res: dict[str, Any], name: str, out: str | None) -> None:
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["finished"] = benchenv.now()
    path = benchenv.write_json(res, f"scale-{name}", out)
    print(f"results written to {path}")


def start(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"bench": f"scale-{name}", "started": benchenv.now(),
            "machine": benchenv.environment(PACKAGES),
            "args": {k: v for k, v in vars(args).items() if k != "func"}}


def timed_process(cmd: list[str], runs: int, *, warmup: int = 1, timeout: float = 600
                  ) -> tuple[dict[str, float], str]:
    """Wall seconds of ``cmd`` as a whole process (start-up included), median of ``runs``."""
    walls, last = [], ""
    for k in range(warmup + runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        last = proc.stdout + proc.stderr
        if k >= warmup:
            walls.append(wall)
    return med(walls), last


# ----------------------------------------------------------------------------------------
# sub-commands
def cmd_store(args: argparse.Namespace) -> dict[str, Any]:
    from featurestore.store import FeatureStore
    from tasks.config import FeatureConfig

    res = start("store", args)
    if os.path.exists(os.path.join(args.store, "store.json")):
        raise SystemExit(f"{args.store} already holds a store: use a new folder")
    store = FeatureStore(args.store, create=True)
    cfg = FeatureConfig()
    print(f"writing {args.tracks:,} tracks x {args.segments_per_track} segments, "
          f"{args.shard_tracks} tracks/shard, {args.commit_group} shards/commit ...", flush=True)
    t = write_generated(store, cfg, 0, args.tracks, seg_per_track=args.segments_per_track,
                        shard_tracks=args.shard_tracks, commit_group=args.commit_group,
                        seed=args.seed, files_dir=args.files)
    sources = t.pop("sources")
    t0 = time.perf_counter()
    manifest = os.path.join(args.files, "manifest.csv")
    with open(manifest, "w") as fh:
        fh.write("uri\n")
        fh.writelines(f"{s['uri']}\n" for s in sources)
    t["manifest_s"] = time.perf_counter() - t0
    shards = -(-args.tracks // args.shard_tracks)
    res |= {"timings": t, "shards": shards, "segments": args.tracks * args.segments_per_track,
            "manifest": manifest, "tables": table_files(store), "store_mb": dir_mb(args.store),
            "tracks_per_s_written": args.tracks / (t["generate_s"] + t["write_s"]),
            "tracks_per_s_total": args.tracks / t["total_s"],
            "commit_s_first_last": [t["commits"][0], t["commits"][-1]]}
    print(f"  files {t['files_s']:.1f} s, generate {t['generate_s']:.1f} s, write "
          f"{t['write_s']:.1f} s, commits {t['commit_s']:.1f} s ({len(t['commits'])} groups; "
          f"first {t['commits'][0]:.2f} s, last {t['commits'][-1]:.2f} s), sources "
          f"{t['sources_s']:.1f} s; total {t['total_s']:.1f} s = "
          f"{res['tracks_per_s_total']:,.0f} tracks/s; store {res['store_mb']:.0f} MB")
    for k, v in res["tables"].items():
        print(f"  {k}: {v}")
    return res


def cmd_compact(args: argparse.Namespace) -> dict[str, Any]:
    from featurestore.maintenance import compact
    from featurestore.store import FeatureStore

    res = start("compact", args)
    store = FeatureStore(args.store)
    res["before"] = table_files(store)
    t0 = time.perf_counter()
    report = compact(store, retention_hours=args.retention_hours)
    res["wall_s"] = time.perf_counter() - t0
    res["report"] = report.to_dict()
    res["after"] = table_files(store)
    res["store_mb_after"] = dir_mb(args.store)
    print(report.render())
    print(f"  wall {res['wall_s']:.1f} s")
    for k in res["after"]:
        print(f"  {k}: {res['before'].get(k)} -> {res['after'][k]}")
    return res


def pick_track(store: Any) -> str:
    fs_id = store.default_feature_set()
    rows = store.read(fs_id, "tracks", ["track_id"])
    ids = rows["track_id"].to_pylist()
    return sorted(ids)[len(ids) // 2]


def cmd_queries(args: argparse.Namespace) -> dict[str, Any]:
    from featurestore.query import connect, run_query
    from featurestore.store import FeatureStore

    res = start("queries", args)
    store = FeatureStore(args.store)
    res["tables"] = table_files(store)
    track = args.track_id or pick_track(store)
    sqls = {k: v.format(track_id=track) for k, v in QUERIES.items()}
    res["sql"] = sqls
    res["label"] = args.label
    print(f"== queries on {args.store} ({args.label}); files: "
          + ", ".join(f"{k.rsplit('/', 1)[-1]} {v['snapshot_files']}"
                      for k, v in res["tables"].items()))
    # in-process
    conn_s, inproc = [], {k: [] for k in sqls}
    rows = {}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        con = connect(store)
        conn_s.append(time.perf_counter() - t0)
        for k, sql in sqls.items():
            t0 = time.perf_counter()
            out = run_query(con, sql)
            inproc[k].append(time.perf_counter() - t0)
            rows[k] = out.num_rows
        con.close()
    res["inprocess"] = {"connect": med(conn_s)} | {k: med(v) for k, v in inproc.items()}
    res["rows"] = rows
    print(f"  in-process connect {fmt(res['inprocess']['connect'])}")
    for k in sqls:
        print(f"  in-process {k:9s} {fmt(res['inprocess'][k])}  rows {rows[k]}")
    if not args.no_process:
        res["process"] = {}
        for k, sql in sqls.items():
            m, _ = timed_process([MTAG, "query", "--store", args.store, sql], args.runs)
            res["process"][k] = m
            print(f"  mtag query {k:9s} {fmt(m)}", flush=True)
        m, _ = timed_process([MTAG, "--help"], args.runs)
        res["process"]["mtag_help"] = m
        print(f"  mtag --help (start-up floor) {fmt(m)}")
        m, _ = timed_process([sys.executable, "-c", "import featurestore.query, "
                              "featurestore.store, deltalake"], args.runs)
        res["process"]["import_floor"] = m
        print(f"  python -c 'import featurestore.query' (import floor) {fmt(m)}")
    return res


def lookup_parts(store_dir: str, source: str) -> dict[str, Any]:
    """The no-op preflight's parts, in-process (what look_up does, each timed)."""
    from featurestore.sources import discover
    from featurestore.store import FeatureStore
    from flows.plan import triage
    from tasks.config import FeatureConfig

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    store = FeatureStore(store_dir, create=True)
    fs_id = store.register_feature_set(FeatureConfig())
    t1 = time.perf_counter()
    files = discover(source)
    t2 = time.perf_counter()
    committed = store.committed_track_ids(fs_id)
    t3 = time.perf_counter()
    known = store.known_sources()
    t4 = time.perf_counter()
    tri = triage(files, known, committed)
    t5 = time.perf_counter()
    out |= {"open_register_s": t1 - t0, "discover_s": t2 - t1, "committed_ids_s": t3 - t2,
            "known_sources_s": t4 - t3, "triage_s": t5 - t4, "total_s": t5 - t0,
            "files": len(files), "to_probe": len(tri.to_probe), "unchanged": tri.unchanged}
    return out


def cmd_noop(args: argparse.Namespace) -> dict[str, Any]:
    res = start("noop", args)
    cmd = [MTAG, "ingest", args.source, "--store", args.store, "--no-progress"]
    m, text = timed_process(cmd, args.runs, timeout=900)
    res["process"] = m
    res["output"] = text[-2000:]
    res["started_cluster"] = "dask" in text.lower() or "dashboard" in text.lower()
    res["import_floor"], _ = timed_process([sys.executable, "-c", "import flows.cli, "
                                            "flows.ingest"], args.runs)
    print(f"== no-op mtag ingest ({args.source} -> {args.store})")
    print(f"  whole process {fmt(m)}")
    print(f"  python -c 'import flows.ingest' (import floor) {fmt(res['import_floor'])}")
    print(f"  output: {text.strip()[-300:]}")
    if res["started_cluster"]:
        print("  !! the output mentions Dask: a cluster was started")
    parts = [lookup_parts(args.store, args.source) for _ in range(args.inproc_runs)]
    res["inprocess"] = {k: med([p[k] for p in parts]) for k in parts[0]
                        if k.endswith("_s")} | {k: parts[0][k] for k in
                                                ("files", "to_probe", "unchanged")}
    for k, v in res["inprocess"].items():
        print(f"  in-process {k:18s} {fmt(v) if isinstance(v, dict) else v}")
    return res


def cmd_increment(args: argparse.Namespace) -> dict[str, Any]:
    """``--new`` tracks into the store through the real write and commit path, then the
    preflight of the next run over the whole catalogue (manifest + new files).
    """
    from featurestore.store import FeatureStore
    from tasks.config import FeatureConfig

    res = start("increment", args)
    store = FeatureStore(args.store)
    cfg = FeatureConfig()
    fs_id = cfg.feature_set_id
    before = store.read(fs_id, "tracks", ["track_id"]).num_rows
    runs = []
    offset = args.offset
    for r in range(args.runs):
        first = offset + r * args.new
        # catalogue = old manifest + the new files (written first: a nightly run finds them)
        rng = np.random.default_rng(args.seed + first)
        durations = rng.uniform(2.0, 4.0, args.new)
        paths, _, _ = make_sparse_files(args.files, first, args.new, durations)
        manifest = os.path.join(args.files, f"manifest-inc{r}.csv")
        with open(args.source) as src, open(manifest, "w") as dst:
            dst.write(src.read())
            dst.writelines(f"{p}\n" for p in paths)
        os.utime(args.files)
        look = lookup_parts(args.store, manifest)
        t0 = time.perf_counter()
        t = write_generated(store, cfg, first, args.new, seg_per_track=args.segments_per_track,
                            shard_tracks=args.new, commit_group=1, seed=args.seed,
                            files_dir=args.files, record_sources=True, log=False)
        t.pop("sources")
        wall = time.perf_counter() - t0
        args.source = manifest
        runs.append({"lookup": look, "write": t, "commit_path_s": wall})
        print(f"  run {r}: preflight {look['total_s']:.2f} s (listing {look['discover_s']:.2f}, "
              f"ids {look['committed_ids_s']:.2f}, sources {look['known_sources_s']:.2f}, "
              f"triage {look['triage_s']:.2f}; {look['to_probe']} to probe); write "
              f"{t['write_s']:.2f} s, commit {t['commit_s']:.2f} s, record_sources "
              f"{t['sources_s']:.2f} s", flush=True)
    res |= {"tracks_before": before, "runs": runs,
            "commit_s": med([x["write"]["commit_s"] for x in runs]),
            "write_s": med([x["write"]["write_s"] for x in runs]),
            "sources_s": med([x["write"]["sources_s"] for x in runs]),
            "preflight_s": med([x["lookup"]["total_s"] for x in runs]),
            "triage_s": med([x["lookup"]["triage_s"] for x in runs]),
            "listing_s": med([x["lookup"]["discover_s"] for x in runs])}
    print(f"== {args.new} new tracks into a store of {before:,}: commit {fmt(res['commit_s'])}; "
          f"write {fmt(res['write_s'])}; record_sources {fmt(res['sources_s'])}; preflight "
          f"{fmt(res['preflight_s'])}")
    return res


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from flows.plan import MAX_TASK_RUNS, batch_shards, plan_shards
    from flows.records import ProbeRecord

    res = start("plan", args)
    rng = np.random.default_rng(args.seed)
    durations = rng.uniform(2.0, 4.0, args.tracks)
    hashes = content_hashes(args.seed, 0, args.tracks)
    t0 = time.perf_counter()
    records = [ProbeRecord(f"/catalogue/p{i // 1000:04d}/t{i:07d}.wav", 88244, 0.0, h, h[:16],
                           "ok", "WAV", 22050, 1, float(d))
               for i, (h, d) in enumerate(zip(hashes, durations, strict=True))]
    t1 = time.perf_counter()
    walls = []
    for _ in range(args.runs):
        t2 = time.perf_counter()
        shards = plan_shards(records, "fs-bench", shard_minutes=args.shard_minutes,
                             workers=args.workers)
        t3 = time.perf_counter()
        task_batches = batch_shards(shards)
        t4 = time.perf_counter()
        walls.append((t3 - t2, t4 - t3))
    sizes = [len(s.tracks) for s in shards]
    per_batch = [len(b.shards) for b in task_batches]
    res |= {"records_s": t1 - t0, "plan_shards_s": med([w[0] for w in walls]),
            "batch_shards_s": med([w[1] for w in walls]), "shards": len(shards),
            "task_runs": len(task_batches), "max_task_runs": MAX_TASK_RUNS,
            "tracks_per_shard": [min(sizes), statistics.median(sizes), max(sizes)],
            "shards_per_task": [min(per_batch), statistics.median(per_batch), max(per_batch)],
            "audio_h": float(durations.sum()) / 3600}
    print(f"== plan for {args.tracks:,} tracks ({res['audio_h']:.0f} h), {args.workers} workers, "
          f"{args.shard_minutes} min shards")
    print(f"  ProbeRecords built in {res['records_s']:.2f} s; plan_shards "
          f"{fmt(res['plan_shards_s'])}; batch_shards {fmt(res['batch_shards_s'])}")
    print(f"  {len(shards):,} shards (tracks/shard min/median/max {res['tracks_per_shard']}), "
          f"{len(task_batches)} task runs (<= {MAX_TASK_RUNS}: "
          f"{'yes' if len(task_batches) <= MAX_TASK_RUNS else 'NO'}); shards/task "
          f"{res['shards_per_task']}")
    if args.flow:
        res["flow"] = trivial_flow(len(task_batches), args.workers)
        print(f"  trivial flow of {len(task_batches)} task runs on a {args.workers}-worker "
              f"LocalCluster: flow wall {res['flow']['flow_s']:.1f} s, with cluster and API "
              f"start/stop {res['flow']['outer_s']:.1f} s")
    return res


def _trivial(batch: int) -> int:
    return batch


def trivial_flow(n: int, workers: int) -> dict[str, float]:
    """A Prefect flow of ``n`` no-op task runs (``.map``) on the ingest flow's runtime."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.runtime import run_on_cluster

    noop = task(name="noop", cache_policy=NO_CACHE)(_trivial)

    @flow(name="scale-trivial", validate_parameters=False)
    def trivial(n: int, workers: int = 1) -> float:
        t0 = time.perf_counter()
        futures = noop.map(list(range(n)))
        got = [f.result() for f in futures]
        assert len(got) == n
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    flow_s = run_on_cluster(trivial, {"n": n}, n_workers=workers)
    return {"flow_s": flow_s, "outer_s": time.perf_counter() - t0, "task_runs": n}


def fast_tracks(folder: str, n: int, *, seed: int, per_dir: int = 1000, bank: int = 64
                ) -> tuple[list[str], float]:
    """``n`` distinct short wav tracks (2-4 s, 22,050 Hz, 16-bit mono), fast: crops of a bank
    of ``bank`` harmonic tone mixtures (orchestration_bench's recipe), each with its own gain
    and noise, so every file has its own content hash; return paths and total seconds.
    """
    import orchestration_bench as ob
    import soundfile as sf

    rng = np.random.default_rng(seed)
    tmp = os.path.join(folder, "_bank")
    base_paths, _ = ob.make_tracks(tmp, bank, seed=seed)
    bases = []
    for path in base_paths:
        y, _ = sf.read(path, dtype="float32")
        bases.append(np.tile(y, 3))  # at least 6 s to crop from
    for path in base_paths:
        os.remove(path)
    paths, total = [], 0.0
    for i in range(n):
        y = bases[int(rng.integers(bank))]
        length = int(rng.uniform(2.0, 4.0) * ob.SR)
        a = int(rng.integers(0, y.size - length))
        clip = y[a:a + length] * rng.uniform(0.3, 1.0)
        clip = clip + rng.uniform(0.005, 0.05) * rng.standard_normal(length, dtype=np.float32)
        clip = 0.5 * clip / max(1e-9, float(np.abs(clip).max()))
        sub = os.path.join(folder, f"part{i // per_dir:04d}")
        if i % per_dir == 0:
            os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"track_{i:06d}.wav")
        sf.write(path, clip, ob.SR, subtype="PCM_16")
        paths.append(path)
        total += length / ob.SR
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return paths, total


def cmd_real(args: argparse.Namespace) -> dict[str, Any]:
    import orchestration_bench as ob

    from featurestore.store import FeatureStore
    from flows.ingest import run_ingest

    res = start("real", args)
    src = os.path.join(args.root, "tracks")
    store = os.path.join(args.root, "store")
    if os.path.exists(store):
        raise SystemExit(f"{store} exists: use a new --root")
    t0 = time.perf_counter()
    gen = fast_tracks if args.generator == "fast" else ob.make_tracks
    _, audio_s = gen(os.path.join(src, "base"), args.tracks, seed=args.seed)
    res["generate_s"] = time.perf_counter() - t0
    res["audio_s"] = audio_s
    print(f"generated {args.tracks:,} tracks ({audio_s / 3600:.2f} h) in "
          f"{res['generate_s']:.0f} s", flush=True)

    def ingest(label: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        s = run_ingest(src, store, n_workers=args.workers, progress=False)
        out = {"outer_wall_s": time.perf_counter() - t0} | {
            k: getattr(s, k) for k in ("files", "ok", "failed", "unchanged", "duplicates",
                                       "segments", "shards", "shards_failed", "audio_s",
                                       "compute_s", "wall_s")}
        print(f"  {label}: {out}", flush=True)
        return out

    res["first"] = ingest("first ingest")
    m, text = timed_process([MTAG, "ingest", src, "--store", store, "--no-progress"],
                            args.runs, warmup=0)
    res["noop_process"] = m
    res["noop_started_cluster"] = "dashboard" in text.lower()
    print(f"  no-op mtag ingest {fmt(m)}: {text.strip()[-160:]}", flush=True)
    inc = max(1, args.tracks // 100)
    gen(os.path.join(src, "increment"), inc, seed=args.seed + 99)
    res["increment_tracks"] = inc
    res["increment"] = ingest(f"increment of {inc}")
    qargs = argparse.Namespace(store=store, runs=args.runs, label="real", track_id=None,
                               no_process=False)
    res["queries"] = cmd_queries(qargs)
    res["store_mb"] = dir_mb(store)
    res["tables"] = table_files(FeatureStore(store))
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON path (default bench/results/scale-<cmd>-<time>.json)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("store", help="(b) write a generated store of N tracks")
    s.add_argument("--store", required=True, help="new store folder")
    s.add_argument("--files", required=True, help="folder for the sparse source files")
    s.add_argument("--tracks", type=int, default=1_000_000)
    s.add_argument("--segments-per-track", type=int, default=1)
    s.add_argument("--shard-tracks", type=int, default=1000)
    s.add_argument("--commit-group", type=int, default=16,
                   help="shards per commit (16: flows.runtime.CommitBuffer's size)")
    s.add_argument("--seed", type=int, default=7)
    s.set_defaults(func=cmd_store)

    s = sub.add_parser("compact", help="featurestore.maintenance.compact, timed")
    s.add_argument("--store", required=True)
    s.add_argument("--retention-hours", type=float, default=168.0)
    s.set_defaults(func=cmd_compact)

    s = sub.add_parser("queries", help="the five analyst queries")
    s.add_argument("--store", required=True)
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--label", default="")
    s.add_argument("--track-id")
    s.add_argument("--no-process", action="store_true", help="in-process only")
    s.set_defaults(func=cmd_queries)

    s = sub.add_parser("noop", help="mtag ingest with nothing new")
    s.add_argument("--store", required=True)
    s.add_argument("--source", required=True, help="the manifest (or folder)")
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--inproc-runs", type=int, default=3)
    s.set_defaults(func=cmd_noop)

    s = sub.add_parser("increment", help="N new tracks through the real commit path")
    s.add_argument("--store", required=True)
    s.add_argument("--source", required=True, help="the store's manifest")
    s.add_argument("--files", required=True, help="the store's sparse files folder")
    s.add_argument("--new", type=int, default=1000)
    s.add_argument("--offset", type=int, default=10_000_000, help="index of the first new track")
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--segments-per-track", type=int, default=1)
    s.add_argument("--seed", type=int, default=7)
    s.set_defaults(func=cmd_increment)

    s = sub.add_parser("plan", help="(c) plan a flow for N tracks")
    s.add_argument("--tracks", type=int, default=1_000_000)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--shard-minutes", type=float, default=60.0)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--flow", action="store_true", help="also run that many trivial task runs")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("real", help="(a) real ingest of N generated tracks")
    s.add_argument("--tracks", type=int, default=5000)
    s.add_argument("--root", required=True, help="new folder for tracks and store")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--generator", choices=("fast", "orchestration"), default="fast",
                   help="fast: noisy crops of 64 tone mixtures (default); orchestration: "
                        "orchestration_bench.make_tracks, one mixture per track (~15 ms each)")
    s.set_defaults(func=cmd_real)

    args = p.parse_args(argv)
    res = args.func(args)
    finish(res, args.cmd, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
