"""A long file is decoded, resampled and featurised in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.slow

HOURS = 2.0
RATE = 8000


def test_two_hour_file_never_held_whole(tmp_path):
    path = tmp_path / "long concert.wav"
    n = int(HOURS * 3600 * RATE)
    with sf.SoundFile(str(path), "w", RATE, 1, subtype="PCM_16") as fh:
        rng = np.random.default_rng(0)
        block = 60 * RATE
        for start in range(0, n, block):
            t = np.arange(start, min(n, start + block)) / RATE
            fh.write(0.3 * np.sin(2 * np.pi * (200 + (t // 60)) * t) + 0.01 *
                     rng.standard_normal(t.size))
    whole_mb = n * 22050 / RATE * 4 / 2**20  # the resampled track as one float32 array
    script = textwrap.dedent(f"""
        import json, os, resource
        from featurestore.sources import SourceFile
        from featurestore.store import FeatureStore
        from flows.ingest_worker import probe_files, run_shard, warm_worker
        from flows.plan import plan_shards
        from tasks.config import FeatureConfig
        c = FeatureConfig()
        warm_worker(c.to_json())
        store = FeatureStore({str(tmp_path / 'store')!r}, create=True)
        store.register_feature_set(c)
        recs = probe_files([SourceFile({str(path)!r}, os.path.getsize({str(path)!r}), 0.0)])
        plan = plan_shards(recs, c.feature_set_id, shard_minutes=600)[0]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = run_shard(store.url, c.to_json(), plan)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({{"before": before, "after": after, "segments": result.counts.n_segments,
                          "ok": result.counts.n_ok}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=600)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    from tasks.config import FeatureConfig
    from tasks.segment import plan_segments, valid_frames

    c = FeatureConfig()
    expected = len(plan_segments(valid_frames(int(HOURS * 3600 * c.sample_rate), c.hop_length),
                                 c))
    assert got["ok"] == 1 and got["segments"] == expected == 2404
    growth = got["after"] - got["before"]
    # bounded: one STFT chunk of temporaries plus the 64 MB spill threshold, whatever the
    # length (the resampled track alone would be ~600 MB)
    assert growth < whole_mb / 3, (growth, whole_mb, got)
