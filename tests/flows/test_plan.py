from __future__ import annotations

import dataclasses

import pytest

from featurestore.sources import SourceFile
from flows.plan import batches, dedupe, plan_shards, triage
from flows.records import ProbeRecord


def rec(i, seconds, status="ok"):
    return ProbeRecord(uri=f"/m/{i:04d}.wav", size_bytes=1, mtime=0.0, content_hash=f"{i:032d}",
                       track_id=f"{i:016d}", status=status, duration_s=seconds)


def test_shards_taper_are_contiguous_and_largest_first():
    records = [rec(i, 60.0 * (1 + i % 5)) for i in range(40)]
    shards = plan_shards(records, "fs-x", shard_minutes=30, workers=2)
    sizes = [s.audio_s for s in shards]
    assert sizes == sorted(sizes, reverse=True)
    assert max(sizes) <= 30 * 60 + 5 * 60  # the cap, give or take the track that crosses it
    # a small catalogue tapers: the last shards to start are a fraction of the first
    assert len(shards) >= 6 and sizes[-1] <= sizes[0] / 2
    assert sorted(t.uri for s in shards for t in s.tracks) == [r.uri for r in records]
    for s in shards:  # consecutive URIs
        idx = [int(t.uri[3:7]) for t in s.tracks]
        assert idx == list(range(idx[0], idx[0] + len(idx)))


def test_a_large_catalogue_keeps_even_shards():
    records = [rec(i, 60.0) for i in range(400)]
    shards = plan_shards(records, "fs-x", shard_minutes=10, workers=2)
    sizes = [s.audio_s for s in shards]
    assert len(shards) in (40, 41) and max(sizes) - min(sizes) <= 60.0


def test_small_catalogue_spreads_over_every_worker():
    shards = plan_shards([rec(i, 200.0) for i in range(16)], "fs-x", shard_minutes=60,
                         workers=2)
    assert len(shards) >= 4 and sum(len(s.tracks) for s in shards) == 16
    # the first two shards (one per worker) hold under two thirds of the work between them
    assert sum(s.audio_s for s in shards[:2]) <= 2 / 3 * 16 * 200.0


def test_shard_ids_are_deterministic_and_cap_tracks():
    records = [rec(i, 1.0) for i in range(50)]
    a = plan_shards(records, "fs-x", shard_minutes=60, workers=1, max_tracks=10)
    b = plan_shards(list(reversed(records)), "fs-x", shard_minutes=60, workers=1,
                    max_tracks=10)
    assert [s.shard_id for s in a] == [s.shard_id for s in b]
    assert max(len(s.tracks) for s in a) <= 10 and sum(len(s.tracks) for s in a) == 50
    assert plan_shards(records, "fs-y", shard_minutes=60)[0].shard_id != a[0].shard_id


def test_triage_and_dedupe():
    files = [SourceFile("/a", 10, 1.0), SourceFile("/b", 10, 1.0), SourceFile("/c", 5, 2.0)]
    known = {"/a": (10, 1.0, "aa" * 16), "/b": (10, 9.9, "bb" * 16)}
    t = triage(files, known, committed={"aa" * 8, "bb" * 8})
    assert t.unchanged == 1 and [f.uri for f in t.to_probe] == ["/b", "/c"]
    keep, skipped = dedupe([rec(1, 1), rec(1, 1), rec(2, 1)], committed={f"{2:016d}"})
    assert [r.track_id for r in keep] == [f"{1:016d}"] and skipped == 2
    assert batches(list(range(10)), 3, 100) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_track_cap_never_overflows():
    # one huge track first pushes everything after it towards the last shards
    records = [rec(0, 10_000.0)] + [rec(i, 1.0) for i in range(1, 60)]
    shards = plan_shards(records, "fs-x", shard_minutes=1000, workers=1, max_tracks=20)
    assert sum(len(s.tracks) for s in shards) == 60
    assert max(len(s.tracks) for s in shards) <= 20


def test_score_parts_cover_each_unscored_shard_once_and_balance_segments():
    from featurestore.scores import ScoredModel
    from featurestore.store import ShardCounts, ShardManifest
    from flows.score import plan_parts

    model = ScoredModel("m", "1", "r", "fs-x", ["a"], False, 0.5, 4, "logmel", "cnn")
    shards = [ShardManifest(f"s-{i:02d}", "fs-x", ShardCounts(10, 9, 1, 100 + 10 * i, 60.0))
              for i in range(12)]
    done = {"s-00", "s-05"}
    plans = plan_parts(shards, done, model, workers=2, max_segments=400)
    covered = [s for p in plans for s in p.shards]
    assert sorted(covered) == sorted(m.shard_id for m in shards if m.shard_id not in done)
    assert len(plans) >= 4 and all(p.n_segments <= 400 for p in plans)
    assert plans == plan_parts(shards, done, model, workers=2, max_segments=400)  # stable ids
    assert plan_parts(shards, {m.shard_id for m in shards}, model, workers=2) == []


def test_score_parts_do_not_overshoot_their_target_by_a_whole_shard():
    from featurestore.scores import ScoredModel
    from featurestore.store import ShardCounts, ShardManifest
    from flows.score import plan_parts

    model = ScoredModel("m", "1", "r", "fs-x", ["a"], False, 0.5, 4, "logmel", "cnn")
    sizes = [500, 500, 100, 500, 500, 100]  # target 550 for 4 parts
    shards = [ShardManifest(f"s-{i:02d}", "fs-x", ShardCounts(n, n, 0, n, 3.0 * n))
              for i, n in enumerate(sizes)]
    plans = plan_parts(shards, set(), model, workers=2)
    assert sorted(p.n_segments for p in plans) == [500, 500, 600, 600]
    # a small remainder joins the last part instead of becoming a task run of its own
    tail = [*shards, ShardManifest("s-99", "fs-x", ShardCounts(40, 40, 0, 40, 120.0))]
    assert sorted(p.n_segments for p in plan_parts(tail, set(), model, workers=2)) == \
        [500, 500, 600, 640]


def test_plans_are_tokenised_by_their_ids_not_their_records():
    """Dask names a task by tokenising its arguments: a plan's token is its id."""
    from dask.base import tokenize

    from flows.records import ScorePlan, ShardBatch

    a = plan_shards([rec(i, 10.0) for i in range(40)], "fs-x", shard_minutes=1, workers=1)[0]
    same_id = dataclasses.replace(a, tracks=a.tracks[:1])
    other = dataclasses.replace(a, shard_id="s-other")
    assert tokenize(a) == tokenize(same_id) != tokenize(other)
    assert tokenize(ShardBatch("b-1", (a,))) != tokenize(ShardBatch("b-2", (a,)))
    assert tokenize(ShardBatch("b-1", (a,))) != tokenize(a)  # the class is in the token
    assert dataclasses.fields(ScorePlan)[0].name == "part_id"  # the id is no field twice
    assert "_id_field" not in {f.name for f in dataclasses.fields(ScorePlan)}


def test_prefect_takes_a_shard_batch_as_one_leaf_and_it_survives_the_trip():
    """Prefect walks a task's parameters on every submit; a batch is one value to it, and it
    pickles, compares and stays immutable as a record should."""
    import pickle

    from prefect.utilities.collections import visit_collection

    from flows.records import ShardBatch

    plans = plan_shards([rec(i, 10.0) for i in range(40)], "fs-x", shard_minutes=1, workers=1)
    batch = ShardBatch("b-1", tuple(plans))
    seen: list[object] = []
    visit_collection({"batch": batch}, visit_fn=lambda x: seen.append(x) or x,
                     return_data=False)
    assert sum(isinstance(x, ShardBatch) for x in seen) == 1
    assert len(seen) < 10  # the dict, its key and the batch: not 40 records field by field
    back = pickle.loads(pickle.dumps(batch))
    assert back == batch and hash(back) == hash(batch) and back.shards[0].tracks
    assert back != ShardBatch("b-2", tuple(plans))
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.batch_id = "b-3"  # type: ignore[misc]
