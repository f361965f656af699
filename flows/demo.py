"""``mtag demo``: render a labelled demo catalogue (no download), ingest it, query it, train
taggers, score the catalogue and show tags and neighbours.

The catalogue is General MIDI music rendered with the soundfont that ships in the
``pretty_midi`` wheel (see :mod:`tasks.synth`); labels are the instrument and the style.
Rendering is skipped for files that already exist, so a second ``mtag demo`` only re-runs the
pipeline (and the ingest is then a no-op).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from featurestore.store import mlflow_db_path

if TYPE_CHECKING:
    import duckdb

DEMO_FORMATS = ("flac", "ogg", "mp3", "wav")
DEMO_MODEL = "mtag-demo-instrument"
DEMO_EPOCHS = 8
DEMO_RATES = (44100, 48000, 32000, 22050)


def _render_one(row: dict) -> str:
    import soundfile as sf

    from tasks.synth import render_track

    path = row["path"]
    if os.path.exists(path):
        return path
    sr = row["sample_rate"]
    y = render_track(row["instrument"], row["style"], seconds=row["seconds"], sample_rate=sr,
                     seed=row["seed"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part"
    fmt = {"ogg": "OGG", "mp3": "MP3", "flac": "FLAC", "wav": "WAV"}[row["ext"]]
    data = np.asarray(y).T
    with sf.SoundFile(tmp, "w", sr, data.shape[1], format=fmt) as fh:
        # tags as a label's files carry them: the style is the genre (`--labels-from-tag`)
        fh.title = f"{row['style']} {row['instrument']} {row['seed']}"
        fh.artist = f"Demo Ensemble {row['seed'] % 9 + 1}"
        fh.album = f"mtag demo: {row['style']}"
        fh.genre = row["style"]
        fh.date = "2026"
        fh.tracknumber = str(row["seed"] % 20 + 1)
        fh.write(data)
    os.replace(tmp, path)
    return path


def make_catalogue(root: str, n_tracks: int, *, seed: int = 7, workers: int = 2) -> str:
    """Render the demo catalogue under ``root`` and write ``labels.csv`` beside it.

    Files get a mix of formats and rates (flac/ogg/mp3/wav at 22.05–48 kHz) like a real
    catalogue. Returns the labels file (``path,label,style``, paths relative to the labels
    file's folder, as ``mtag train`` reads them).
    """
    from tasks.synth import demo_catalogue_plan

    plan = demo_catalogue_plan(n_tracks, seed=seed)
    rows = []
    for i, item in enumerate(plan):
        ext = DEMO_FORMATS[i % len(DEMO_FORMATS)]
        rel = f"{item['stem']}.{ext}"
        rows.append(item | {"ext": ext, "rel": rel, "path": os.path.join(root, rel),
                            "sample_rate": DEMO_RATES[i % len(DEMO_RATES)]})
    todo = [r for r in rows if not os.path.exists(r["path"])]
    if todo:
        print(f"Rendering {len(todo)} demo tracks with the General MIDI soundfont ...")
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_render_one, todo, chunksize=4))
        print(f"  rendered in {time.perf_counter() - started:.1f} s")
    labels = os.path.join(os.path.dirname(os.path.abspath(root)), "labels.csv")
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "style"])
        for r in rows:
            writer.writerow([os.path.join(os.path.basename(os.path.abspath(root)), r["rel"]),
                             r["instrument"], r["style"]])
    return labels


def run_demo(directory: str, *, n_tracks: int = 120, workers: int | None = None,
             progress: bool = True, train: bool = True) -> int:
    """Generate, ingest and query the demo catalogue under ``directory``; then train, score
    and find neighbours (unless ``train`` is off). One local Dask cluster serves every step.
    """
    from flows.cluster import dask_cluster, default_workers

    catalogue = os.path.abspath(os.path.join(directory, "catalogue"))
    store = os.path.join(directory, "store")
    labels = make_catalogue(catalogue, n_tracks, workers=workers or default_workers())
    with dask_cluster(None, n_workers=workers, echo=print) as cluster:
        _ingest(catalogue, store, labels, cluster.address, progress)
        if train:
            _train(store, labels)
            _score(store, cluster.address, progress)
    return 0


def _ingest(catalogue: str, store: str, labels: str, address: str, progress: bool) -> None:
    from featurestore.query import connect
    from featurestore.store import FeatureStore
    from flows.ingest import run_ingest

    print(f"\n$ mtag ingest {catalogue} --store {store}")
    summary = run_ingest(catalogue, store, dask_address=address, shard_minutes=5.0,
                         progress=progress)
    print(summary.render())
    con = connect(FeatureStore(store), read_only=False)  # the demo's labels are outside it
    con.execute(f"CREATE VIEW labels AS SELECT * FROM read_csv('{labels}')")
    queries = [
        ("Tracks by status and format",
         "SELECT status, format, count(*) AS tracks, round(sum(duration_s) / 60, 1) AS minutes "
         "FROM tracks GROUP BY ALL ORDER BY ALL"),
        ("Brightness and noisiness per instrument (segment means)",
         "SELECT l.label AS instrument, count(*) AS segments, "
         "round(avg(s.centroid_mean)) AS centroid_hz, round(avg(s.rolloff_mean)) AS rolloff_hz, "
         "round(avg(s.flatness_mean), 4) AS flatness, round(avg(s.zcr_mean), 4) AS zcr "
         "FROM segments s JOIN tracks t USING (track_id) "
         f"JOIN labels l ON t.path = '{os.path.dirname(catalogue)}/' || l.path "
         "GROUP BY 1 ORDER BY centroid_hz"),
    ]
    _show(con, store, queries)
    con.close()


def _show(con: duckdb.DuckDBPyConnection, store: str, queries: list[tuple[str, str]]) -> None:
    from featurestore.query import format_result, run_query

    for title, sql in queries:
        print(f"\n-- {title}\n$ mtag query --store {store} \"{sql}\"")
        sys.stdout.write(format_result(run_query(con, sql), "table"))


def _train(store: str, labels: str) -> None:
    from flows.train import (
        candidate_line,
        open_set_line,
        selection_line,
        split_line,
        train_flow,
    )
    from training.evaluate import render_report

    print(f"\n$ mtag train --store {store} --labels {labels} --model auto "
          f"--registered-name {DEMO_MODEL} --epochs {DEMO_EPOCHS}")
    summary = train_flow(store=store, labels=labels, model="auto",
                         registered_name=DEMO_MODEL, train_config={"epochs": DEMO_EPOCHS})
    print(summary.labels_report)
    print(split_line(summary.split))
    for cand in summary.candidates:
        print(f"{candidate_line(cand)}, {cand['train_seconds']:.0f} s")
    if summary.selection:
        print(selection_line(summary.selection))
    print(open_set_line(summary.best.get("open_set")))
    promo = summary.promotion
    print(f"best: {summary.best['model']} -> {DEMO_MODEL} v{promo['version']} "
          f"({'now @champion' if promo['promoted'] else 'champion unchanged'}: "
          f"{promo['reason']})")
    print(render_report(summary.best["test"], "test tracks"))
    print(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{mlflow_db_path(store)}")


def _score(store: str, address: str, progress: bool) -> None:
    from featurestore.query import connect, format_result
    from featurestore.store import FeatureStore
    from flows.neighbours import run_neighbours, similar
    from flows.score import run_score

    uri = f"models:/{DEMO_MODEL}@champion"
    print(f"\n$ mtag score --store {store} --model-uri {uri}")
    summary = run_score(store, uri, dask_address=address, progress=progress)
    print(summary.render())
    print(f"\n$ mtag neighbours --store {store} --k 5")
    out = run_neighbours(store, k=5, dask_address=address, progress=progress)
    print(f"{out.tracks} tracks x {out.k} neighbours ({out.method} search)")
    con = connect(FeatureStore(store))
    _show(con, store, [
        ("Tag distribution: predicted instrument, mean confidence, tracks not confident",
         "SELECT label, count(*) AS tracks, round(avg(probability), 3) AS mean_p, "
         "count(*) FILTER (NOT confident) AS unsure FROM scores GROUP BY 1 ORDER BY 2 DESC"),
        ("Least confident tracks (open set: unlike the labelled tracks, or the least sure)",
         "SELECT regexp_extract(path, '[^/]+/[^/]+$') AS file, label, "
         "round(probability, 3) AS p, top_labels[2] AS runner_up, round(novelty, 2) AS "
         "novelty, confident FROM scores ORDER BY confident, probability LIMIT 5"),
        ("How often a track's 5 nearest neighbours share its predicted instrument",
         "SELECT round(avg((a.label = b.label)::int), 3) AS same_label_share "
         "FROM neighbours n JOIN scores a USING (track_id) "
         "JOIN scores b ON b.track_id = n.neighbour_id"),
    ])
    first = con.execute("SELECT path FROM scores ORDER BY path LIMIT 1").fetchone()
    con.close()
    if first:
        import pyarrow as pa

        found, info = similar(store, first[0], k=5)
        print(f"\n$ mtag similar '{first[0]}' --store {store} --k 5   ({info['label']})")
        sys.stdout.write(format_result(pa.Table.from_pandas(found, preserve_index=False),
                                       "table"))
