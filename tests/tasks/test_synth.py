from __future__ import annotations

import itertools
import re
from collections import Counter

import librosa
import numpy as np
import pytest

from tasks.errors import ParameterError
from tasks.synth import (
    INSTRUMENTS,
    STYLES,
    demo_catalogue_plan,
    render_track,
    soundfont_path,
)
from tasks.units import seconds_to_samples

SR = 22050


def _mfcc_mean(y: np.ndarray) -> np.ndarray:
    return librosa.feature.mfcc(y=y.mean(axis=0), sr=SR, n_mfcc=20).mean(axis=1)


def _centroid(y: np.ndarray) -> float:
    return float(librosa.feature.spectral_centroid(y=y.mean(axis=0), sr=SR).mean())


def test_labels_are_distinct_programs_and_styles():
    assert len(INSTRUMENTS) >= 5
    assert len(set(INSTRUMENTS.values())) == len(INSTRUMENTS)
    assert all(0 <= p <= 127 for p in INSTRUMENTS.values())
    assert len(STYLES) >= 3
    assert any(s.drums for s in STYLES.values()) and not all(s.drums for s in STYLES.values())


def test_soundfont_ships_with_pretty_midi():
    path = soundfont_path()
    assert path.name == "TimGM6mb.sf2" and path.stat().st_size > 1_000_000


def test_missing_soundfont_names_the_path(monkeypatch, tmp_path):
    import pretty_midi

    monkeypatch.setattr(pretty_midi, "__file__", str(tmp_path / "pretty_midi" / "__init__.py"))
    expected = str(tmp_path / "pretty_midi" / "TimGM6mb.sf2")
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        render_track("piano", "ballad", seconds=1.0, seed=0)


@pytest.mark.parametrize(("instrument", "style"), list(itertools.product(INSTRUMENTS, STYLES)))
def test_shape_dtype_finite_and_peak(instrument, style):
    y = render_track(instrument, style, seconds=2.0, seed=7)
    assert y.shape == (2, 2 * SR)
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    peak = float(np.abs(y).max())
    assert 0 < peak <= 1
    assert peak == pytest.approx(0.8, abs=1e-3)
    # Music, not a click: the level stays up over the clip (every quarter has sound).
    rms = np.sqrt((y.reshape(2, 4, -1) ** 2).mean(axis=(0, 2)))
    assert (rms > 0.01).all()


def test_deterministic_for_a_seed():
    a = render_track("guitar", "dance", seconds=3.0, seed=123)
    b = render_track("guitar", "dance", seconds=3.0, seed=123)
    np.testing.assert_array_equal(a, b)


def test_different_seeds_differ():
    a = render_track("guitar", "march", seconds=3.0, seed=1)
    b = render_track("guitar", "march", seconds=3.0, seed=2)
    assert not np.allclose(a, b, atol=1e-3)


def test_stereo_channels_differ():
    y = render_track("piano", "ballad", seconds=3.0, seed=4)
    assert not np.allclose(y[0], y[1])


@pytest.mark.parametrize(
    ("seconds", "sample_rate"),
    [(0.5, 22050), (1.23456, 22050), (3.0, 16000), (2.00001, 44100), (0.0001, 8000)],
)
def test_length_matches_request(seconds, sample_rate):
    y = render_track("flute", "dance", seconds=seconds, sample_rate=sample_rate, seed=3)
    assert y.shape[0] == 2
    assert y.shape[1] == seconds_to_samples(seconds, sample_rate)
    assert abs(y.shape[1] - seconds * sample_rate) <= 1


def test_unknown_instrument_and_style_raise_value_error():
    with pytest.raises(ValueError, match="unknown instrument 'kazoo'"):
        render_track("kazoo", "ballad", seconds=1.0, seed=0)
    with pytest.raises(ParameterError, match="unknown style 'polka'"):
        render_track("piano", "polka", seconds=1.0, seed=0)


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_length_raises(seconds):
    with pytest.raises(ValueError, match="seconds"):
        render_track("piano", "ballad", seconds=seconds, seed=0)


def test_bad_sample_rate_raises():
    with pytest.raises(ValueError, match="sample_rate"):
        render_track("piano", "ballad", seconds=1.0, sample_rate=0, seed=0)


@pytest.mark.parametrize("style", ["ballad", "march"])
def test_flute_is_brighter_than_piano(style):
    # Same seeds, so the same notes: only the timbre differs.
    flute = [_centroid(render_track("flute", style, seconds=4.0, seed=s)) for s in range(3)]
    piano = [_centroid(render_track("piano", style, seconds=4.0, seed=s)) for s in range(3)]
    assert min(flute) > 1.2 * max(piano)


@pytest.mark.parametrize("style", list(STYLES))
def test_instruments_differ_more_than_seeds(style):
    seeds = (0, 1, 2)
    feats = {(i, s): _mfcc_mean(render_track(i, style, seconds=4.0, seed=s))
             for i in INSTRUMENTS for s in seeds}
    within = [np.linalg.norm(feats[i, a] - feats[i, b])
              for i in INSTRUMENTS for a, b in itertools.combinations(seeds, 2)]
    between = [np.linalg.norm(feats[i, s] - feats[j, s])
               for i, j in itertools.combinations(INSTRUMENTS, 2) for s in seeds]
    assert np.mean(between) > 1.5 * np.mean(within)


@pytest.mark.parametrize("n", [0, 1, 7, 18, 50])
def test_plan_is_balanced_and_well_formed(n):
    plan = demo_catalogue_plan(n, seed=5)
    assert len(plan) == n
    stems = [row["stem"] for row in plan]
    assert len(set(stems)) == n
    for k, row in enumerate(plan):
        assert set(row) == {"instrument", "style", "seed", "seconds", "stem"}
        assert row["instrument"] in INSTRUMENTS and row["style"] in STYLES
        assert isinstance(row["seed"], int)
        assert 4.0 <= row["seconds"] <= 20.0
        assert row["stem"] == f"{row['instrument']}/{row['style']}_{k:04d}"
    if n:
        for counts, labels in ((Counter(r["instrument"] for r in plan), INSTRUMENTS),
                               (Counter(r["style"] for r in plan), STYLES)):
            full = [counts.get(label, 0) for label in labels]
            assert max(full) - min(full) <= 1
        pairs = Counter((r["instrument"], r["style"]) for r in plan)
        full = [pairs.get(p, 0) for p in itertools.product(INSTRUMENTS, STYLES)]
        assert max(full) - min(full) <= 1


def test_plan_is_deterministic_and_varied():
    plan = demo_catalogue_plan(40, seed=9)
    assert plan == demo_catalogue_plan(40, seed=9)
    assert plan != demo_catalogue_plan(40, seed=10)
    assert len({row["seed"] for row in plan}) == 40
    assert np.ptp([row["seconds"] for row in plan]) > 8


def test_plan_rejects_negative_count():
    with pytest.raises(ValueError, match="n_tracks"):
        demo_catalogue_plan(-1, seed=0)


def test_plan_rows_render():
    row = demo_catalogue_plan(1, seed=2)[0]
    y = render_track(row["instrument"], row["style"], seconds=row["seconds"], seed=row["seed"])
    assert y.shape == (2, seconds_to_samples(row["seconds"], SR))
