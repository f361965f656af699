"""Worker-side bodies without orchestration: fsspec URLs, probing, one shard."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import soundfile as sf
from factories import music_like

from featurestore.hashing import content_hash
from featurestore.sources import SourceFile, discover
from featurestore.store import FeatureStore
from flows.ingest_worker import probe_one, run_shard
from flows.plan import plan_shards
from tasks.config import FeatureConfig


def test_fsspec_url_source_is_listed_hashed_probed_and_decoded(tmp_path):
    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    sf.write(buf, music_like(4.0, 44100, seed=5), 44100, format="FLAC")
    fs.pipe("/bucket/cat/a b.flac", buf.getvalue())
    fs.pipe("/bucket/cat/notes.txt", b"hello")
    files = discover("memory://bucket/cat/")
    # canonical URIs, as the filesystem writes them (memory:// keeps its root "/")
    assert [f.uri for f in files] == ["memory:///bucket/cat/a b.flac",
                                      "memory:///bucket/cat/notes.txt"]
    assert files[0].size_bytes == len(buf.getvalue())
    rec = probe_one(files[0])
    assert rec.status == "ok" and rec.sample_rate == 44100
    assert rec.content_hash == content_hash("memory:///bucket/cat/a b.flac")
    assert probe_one(files[1]).status == "unsupported"

    c = FeatureConfig()
    store = FeatureStore(str(tmp_path / "store"), create=True)
    store.register_feature_set(c)
    plan = plan_shards([rec], c.feature_set_id, shard_minutes=60)[0]
    result = run_shard(store.url, c.to_json(), plan)
    assert (result.counts.n_ok, result.counts.n_segments) == (1, 2)
    assert result.errors == []


def test_unreadable_file_is_a_probe_failure_tried_again(tmp_path):
    rec = probe_one(SourceFile(str(tmp_path / "gone.wav"), -1, 0.0))
    assert rec.status == "failed" and rec.stage == "probe" and "file is gone" in rec.error
    assert rec.retry  # transient: the next run tries it again
    again = probe_one(SourceFile(str(tmp_path / "gone.wav"), -1, 0.0))
    assert rec.track_id == again.track_id  # stable id for the same URI


def test_hash_is_content_not_name(tmp_path):
    data = np.zeros(100, dtype=np.int16).tobytes()
    (tmp_path / "x.raw").write_bytes(data)
    (tmp_path / "y.raw").write_bytes(data)
    assert content_hash(str(tmp_path / "x.raw")) == content_hash(str(tmp_path / "y.raw"))
    (tmp_path / "y.raw").write_bytes(data + b"\0")
    assert content_hash(str(tmp_path / "x.raw")) != content_hash(str(tmp_path / "y.raw"))


def test_fifos_and_devices_get_a_status_and_are_never_opened(tmp_path):
    import os

    from featurestore.sources import discover

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)  # reading it would block forever
    (tmp_path / "zero.wav").symlink_to("/dev/zero")  # reading it would never end
    records = {os.path.basename(r.uri): r for r in map(probe_one, discover(str(tmp_path)))}
    assert set(records) == {"pipe.wav", "zero.wav"}
    assert records["pipe.wav"].status == "failed" and "FIFO" in records["pipe.wav"].error
    assert records["zero.wav"].status == "failed" and "device" in records["zero.wav"].error
    assert records["pipe.wav"].track_id != records["zero.wav"].track_id
