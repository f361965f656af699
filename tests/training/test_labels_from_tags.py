"""Labels from the files' own tags: `mtag train --labels-from-tag genre --group-column artist`
normalises the values (case, spacing, multi-valued tags), counts the tracks without a tag, and
keeps each artist on one side of the split."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from factories import music_like

from flows.ingest import run_ingest
from training.trainer import prepare

pytestmark = pytest.mark.slow

GENRES = ["Rock", "rock ", "JAZZ", "Jazz", "folk", "Folk ", None]


@pytest.fixture(scope="module")
def tagged_store(tmp_path_factory, dask_address):
    root = tmp_path_factory.mktemp("tagged")
    cat = root / "cat"
    cat.mkdir()
    for i in range(42):
        genre = GENRES[i % len(GENRES)]
        with sf.SoundFile(str(cat / f"t{i:02d}.flac"), "w", 22050, 1, format="FLAC") as fh:
            if genre:
                fh.genre = genre
            fh.artist = f"Artist {i % 14}" if i % 2 else f"artist  {i % 14}"  # same artists
            fh.write(np.asarray(music_like(2.0, 22050, seed=i)))
    store = str(root / "store")
    run_ingest(str(cat), store, dask_address=dask_address, progress=False)
    return store


def test_tag_values_are_normalised_counted_and_artists_kept_together(tagged_store):
    prep = prepare(tagged_store, "tag:genre", group_column="artist", valid_size=0.2,
                   test_size=0.2)
    assert prep.labels.classes == ["folk", "jazz", "rock"]
    assert prep.labels.dropped()["empty_label"] == 6  # the six files without a genre tag
    frame = prep.labels.frame
    assert len(frame) == 36
    sides = frame.groupby("group")["split"].nunique()
    assert (sides == 1).all()  # "Artist 3" and "artist  3" are one artist, on one side
    assert frame["group"].nunique() == 12  # artists 6 and 13 have only untagged files


def test_an_unknown_tag_is_one_error_line():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--store", "/nonexistent",
                          "--labels-from-tag", "mood"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "mtag: error: --labels-from-tag 'mood' is not a tag column; choose from title, artist, "
        "artists, album, album_artist, composer, genre, date, year, track_number, track_total, "
        "disc_number, disc_total, isrc, musicbrainz_recording_id, musicbrainz_track_id, "
        "musicbrainz_release_id, musicbrainz_release_group_id, musicbrainz_artist_id, "
        "musicbrainz_album_artist_id, musicbrainz_work_id"]
