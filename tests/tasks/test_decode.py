from __future__ import annotations

import numpy as np
import pytest
from factories import tone, write

from tasks.decode import audio_format, open_audio, probe, read_blocks
from tasks.errors import DecodeError

FORMATS = [
    ("wav", {}), ("flac", {}), ("ogg", {"format": "OGG", "subtype": "VORBIS"}),
    ("opus", {"format": "OGG", "subtype": "OPUS"}), ("mp3", {"format": "MP3"}),
    ("aiff", {}),
]


@pytest.mark.parametrize("ext, kwargs", FORMATS)
def test_every_supported_format_decodes(tmp_path, ext, kwargs):
    sr = 48000
    y = np.stack([tone(440, 2.0, sr), tone(660, 2.0, sr)])
    path = write(str(tmp_path / f"x.{ext}"), y, sr, **kwargs)
    info = probe(path)
    assert (info.sample_rate, info.channels) == (sr, 2)
    with open_audio(path) as snd:
        blocks = list(read_blocks(snd, block_frames=10_000))
    assert all(b.shape[0] == 2 and b.dtype == np.float32 for b in blocks)
    total = sum(b.shape[1] for b in blocks)
    assert abs(total - y.shape[1]) <= 2400  # lossy codecs may pad or trim a few ms
    assert audio_format(path) == ("ogg" if ext == "ogg" else ext)


def test_blocks_are_bounded(tmp_path):
    path = write(str(tmp_path / "long.wav"), tone(100, 10.0, 22050), 22050)
    with open_audio(path) as snd:
        sizes = [b.shape[1] for b in read_blocks(snd, block_frames=4096)]
    assert max(sizes) == 4096 and sum(sizes) == 220500


@pytest.mark.parametrize("content, message", [
    (b"", "not decodable"), (b"hello, this is text" * 20, "not decodable")])
def test_non_audio_raises_decode_error(tmp_path, content, message):
    path = tmp_path / "fake.mp3"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=message) as err:
        probe(str(path))
    assert "does not exist" not in str(err.value)  # the file is there: libsndfile's words mislead


def test_missing_file_raises_decode_error(tmp_path):
    with pytest.raises(DecodeError):
        probe(str(tmp_path / "absent.wav"))


def test_unsupported_extension():
    assert audio_format("cover.JPG") is None
    assert audio_format("Song.FLAC") == "flac"
