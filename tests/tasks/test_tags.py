"""tasks.tags: known tags written into each container are read back; bad files never raise.

Tags are written with mutagen (GPL: a test-only tool, never imported by tasks/) where it can,
and as raw bytes where it cannot (RIFF INFO, a bare MP4 ``moov/udta/meta/ilst`` tree, ID3v1).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import soundfile as sf

from tasks.tags import (
    NAME_SEPARATORS,
    TAG_FIELDS,
    normalise_tag_values,
    read_tags,
    split_tag_values,
)

REC = "e5d3a6f4-1f0c-4f1a-9c1b-9b5d2a3e4f50"
REL = "1d9e8ed6-3893-4d3b-aa7d-6cd79609e386"
ART1 = "a74b1b7f-71a5-4011-9441-d0b5e4122711"
ART2 = "b74b1b7f-71a5-4011-9441-d0b5e4122712"
TITLE = "Ünïcödé ☃ – 東京"


def _audio(path, fmt=None, subtype=None, sr=22050):
    y = (0.1 * np.sin(np.arange(sr // 2) * 0.1)).astype(np.float32)
    sf.write(str(path), y, sr, format=fmt, subtype=subtype)
    return str(path)


def _assert_shape(rec):
    assert set(rec) == set(TAG_FIELDS)
    for key in ("genre", "artists", "musicbrainz_artist_id", "musicbrainz_album_artist_id"):
        assert isinstance(rec[key], list)


# --- containers -------------------------------------------------------------------------
@pytest.mark.parametrize("version", [3, 4])
def test_id3v2_mp3(tmp_path, version):
    from mutagen.id3 import ID3, TALB, TCON, TDRC, TIT2, TPE1, TPE2, TPOS, TRCK, TSRC, TXXX, UFID

    path = _audio(tmp_path / "a.mp3", "MP3", "MPEG_LAYER_III")
    t = ID3()
    t.add(TIT2(encoding=3 if version == 4 else 1, text=TITLE))
    t.add(TPE1(encoding=1, text=["Artist A", "Artist B"]))
    t.add(TALB(encoding=0, text="Album é"))  # latin-1
    t.add(TPE2(encoding=3, text="Various Artists"))
    t.add(TCON(encoding=3, text=["Rock", "Pop; Jazz"]))
    t.add(TDRC(encoding=3, text="2019-03-04"))
    t.add(TRCK(encoding=3, text="3/12"))
    t.add(TPOS(encoding=3, text="1/2"))
    t.add(TSRC(encoding=3, text="USRC17607839"))
    t.add(TXXX(encoding=3, desc="MusicBrainz Album Id", text=REL))
    t.add(TXXX(encoding=3, desc="MusicBrainz Artist Id", text=[ART1, ART2]))
    t.add(UFID(owner="http://musicbrainz.org", data=REC.encode()))
    t.save(path, v2_version=version)

    rec = read_tags(path)
    _assert_shape(rec)
    assert rec["error"] is None
    assert rec["title"] == TITLE
    assert rec["album"] == "Album é"
    assert rec["album_artist"] == "Various Artists"
    assert rec["genre"] == ["Rock", "Pop", "Jazz"]
    assert (rec["date"], rec["year"]) == ("2019-03-04", 2019)
    assert (rec["track_number"], rec["track_total"]) == (3, 12)
    assert (rec["disc_number"], rec["disc_total"]) == (1, 2)
    assert rec["isrc"] == "USRC17607839"
    assert rec["musicbrainz_recording_id"] == REC
    assert rec["musicbrainz_release_id"] == REL
    assert rec["musicbrainz_artist_id"] == [ART1, ART2]
    if version == 4:
        assert rec["artists"] == ["Artist A", "Artist B"]
    else:  # v2.3 has no multi-value text: mutagen joins with '/', kept whole for names
        assert rec["artist"] == "Artist A/Artist B"


def test_id3v1_only(tmp_path):
    path = _audio(tmp_path / "v1.mp3", "MP3", "MPEG_LAYER_III")
    tag = (b"TAG" + b"Old Title".ljust(30, b"\0") + b"Old Artist".ljust(30, b"\0")
           + b"Old Album".ljust(30, b"\0") + b"1987" + b"comment".ljust(28, b"\0")
           + b"\0" + bytes([5]) + bytes([17]))  # track 5, genre 17 = Rock
    with open(path, "ab") as fh:
        fh.write(tag)
    rec = read_tags(path)
    assert rec["error"] is None
    assert (rec["title"], rec["artist"], rec["album"]) == ("Old Title", "Old Artist", "Old Album")
    assert rec["year"] == 1987 and rec["track_number"] == 5 and rec["genre"] == ["Rock"]


def _vorbis_fields(tags):
    tags["title"] = TITLE
    tags["artist"] = ["X", "Y"]
    tags["albumartist"] = "Z"
    tags["album"] = "Álbum"
    tags["genre"] = ["Electronic/Dance", "ambient"]
    tags["date"] = "2001-05"
    tags["tracknumber"] = "7"
    tags["tracktotal"] = "9"
    tags["discnumber"] = "2"
    tags["isrc"] = "GB-AYE-06-01498"
    tags["musicbrainz_trackid"] = REC
    tags["musicbrainz_releasetrackid"] = REL
    tags["musicbrainz_albumartistid"] = ART1
    tags["musicbrainz_releasegroupid"] = ART2
    tags["musicbrainz_workid"] = REL


def _check_vorbis(rec):
    _assert_shape(rec)
    assert rec["error"] is None
    assert rec["title"] == TITLE
    assert rec["artists"] == ["X", "Y"] and rec["artist"] == "X"
    assert rec["album"] == "Álbum" and rec["album_artist"] == "Z"
    assert rec["genre"] == ["Electronic", "Dance", "ambient"]
    assert (rec["date"], rec["year"]) == ("2001-05", 2001)
    assert (rec["track_number"], rec["track_total"], rec["disc_number"]) == (7, 9, 2)
    assert rec["isrc"] == "GBAYE0601498"
    assert rec["musicbrainz_recording_id"] == REC
    assert rec["musicbrainz_track_id"] == REL
    assert rec["musicbrainz_album_artist_id"] == [ART1]
    assert rec["musicbrainz_release_group_id"] == ART2
    assert rec["musicbrainz_work_id"] == REL


def test_flac_vorbis_comments(tmp_path):
    from mutagen.flac import FLAC

    path = _audio(tmp_path / "a.flac")
    f = FLAC(path)
    _vorbis_fields(f)
    f.save()
    _check_vorbis(read_tags(path))


def test_ogg_vorbis(tmp_path):
    from mutagen.oggvorbis import OggVorbis

    path = _audio(tmp_path / "a.ogg", "OGG", "VORBIS")
    f = OggVorbis(path)
    _vorbis_fields(f)
    f.save()
    _check_vorbis(read_tags(path))


def test_opus(tmp_path):
    from mutagen.oggopus import OggOpus

    path = _audio(tmp_path / "a.opus", "OGG", "OPUS", sr=48000)
    f = OggOpus(path)
    _vorbis_fields(f)
    f.save()
    _check_vorbis(read_tags(path))


def _riff_info(fields: dict[bytes, str]) -> bytes:
    body = b"INFO"
    for key, text in fields.items():
        data = text.encode("utf-8") + b"\0"
        body += key + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")
    return b"LIST" + struct.pack("<I", len(body)) + body


def test_wav_riff_info(tmp_path):
    path = _audio(tmp_path / "a.wav")
    raw = bytearray(open(path, "rb").read())
    raw += _riff_info({b"INAM": TITLE, b"IART": "Ärtist", b"IPRD": "Prod", b"IGNR": "Folk; Rock",
                       b"ICRD": "1999", b"ITRK": "4", b"ISRC": "USRC17607839"})
    raw[4:8] = struct.pack("<I", len(raw) - 8)
    open(path, "wb").write(bytes(raw))
    assert sf.info(path).frames == 11025  # still a valid file
    rec = read_tags(path)
    assert rec["error"] is None
    assert (rec["title"], rec["artist"], rec["album"]) == (TITLE, "Ärtist", "Prod")
    assert rec["genre"] == ["Folk", "Rock"]
    assert rec["year"] == 1999 and rec["track_number"] == 4 and rec["isrc"] == "USRC17607839"


def test_wav_id3_chunk(tmp_path):
    from mutagen.id3 import TIT2, TPE1
    from mutagen.wave import WAVE

    path = _audio(tmp_path / "b.wav")
    w = WAVE(path)
    w.add_tags()
    w.tags.add(TIT2(encoding=3, text="In a chunk"))
    w.tags.add(TPE1(encoding=3, text="Chunky"))
    w.save()
    rec = read_tags(path)
    assert rec["error"] is None and (rec["title"], rec["artist"]) == ("In a chunk", "Chunky")


def _atom(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _text_item(kind: bytes, text: str) -> bytes:
    return _atom(kind, _atom(b"data", struct.pack(">I", 1) + b"\0\0\0\0" + text.encode()))


def _mp4(items: bytes) -> bytes:
    hdlr = _atom(b"hdlr", b"\0" * 8 + b"mdirappl" + b"\0" * 9)
    meta = _atom(b"meta", b"\0\0\0\0" + hdlr + _atom(b"ilst", items))
    ftyp = _atom(b"ftyp", b"M4A \0\0\0\0M4A mp42isom")
    return ftyp + _atom(b"moov", _atom(b"udta", meta))


def _freeform(name: str, value: str) -> bytes:
    return _atom(b"----", _atom(b"mean", b"\0\0\0\0com.apple.iTunes")
                 + _atom(b"name", b"\0\0\0\0" + name.encode())
                 + _atom(b"data", struct.pack(">I", 1) + b"\0\0\0\0" + value.encode()))


def test_mp4_atoms(tmp_path):
    trkn = _atom(b"trkn", _atom(b"data", b"\0\0\0\0\0\0\0\0" + struct.pack(">HHHH", 0, 5, 11, 0)))
    items = (_text_item(b"\xa9nam", TITLE) + _text_item(b"\xa9ART", "M4A Artist")
             + _text_item(b"aART", "Album Artist") + _text_item(b"\xa9alb", "Albüm")
             + _text_item(b"\xa9gen", "Jazz, Funk") + _text_item(b"\xa9day", "2020-01-02T00:00:00Z")
             + trkn + _freeform("MusicBrainz Track Id", REC)
             + _freeform("MusicBrainz Album Id", REL) + _freeform("ISRC", "USRC17607839"))
    path = tmp_path / "a.m4a"
    path.write_bytes(_mp4(items))
    rec = read_tags(str(path))
    assert rec["error"] is None
    assert (rec["title"], rec["artist"], rec["album_artist"], rec["album"]) == (
        TITLE, "M4A Artist", "Album Artist", "Albüm")
    assert rec["genre"] == ["Jazz", "Funk"]
    assert rec["year"] == 2020 and (rec["track_number"], rec["track_total"]) == (5, 11)
    assert rec["musicbrainz_recording_id"] == REC and rec["musicbrainz_release_id"] == REL
    assert rec["isrc"] == "USRC17607839"


def test_fsspec_url(tmp_path):
    import fsspec
    from mutagen.flac import FLAC

    path = _audio(tmp_path / "m.flac")
    f = FLAC(path)
    f["title"] = "over fsspec"
    f.save()
    with fsspec.open("memory://cat/m.flac", "wb") as out:
        out.write(open(path, "rb").read())
    assert read_tags("memory://cat/m.flac")["title"] == "over fsspec"


# --- bad input never raises ---------------------------------------------------------------
def test_no_tags(tmp_path):
    rec = read_tags(_audio(tmp_path / "plain.wav"))
    _assert_shape(rec)
    assert rec["error"] is None and rec["title"] is None and rec["genre"] == []


@pytest.mark.parametrize("name,data", [
    ("empty.mp3", b""),
    ("noise.mp3", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))),
    ("text.flac", b"this is not a flac file at all"),
    ("trunc.m4a", _mp4(_text_item(b"\xa9nam", "cut"))[:-3]),
    ("huge.mp3", b"ID3\x04\x00\x00\x7f\x7f\x7f\x7fTIT2\x00\x00\x00\x05\x00\x03ab"),
    ("badframe.mp3", b"ID3\x03\x00\x00\x00\x00\x01\x00TIT2\xff\xff\xff\xff\x01\xff\xfe"),
    ("zeros.ogg", b"OggS" + b"\0" * 200),
    ("riff.wav", b"RIFF\x10\x00\x00\x00WAVELIST\xff\xff\xff\x7fINFO"),
    ("unknown.xyz", b"\x00\x01\x02"),
])
def test_malformed_files_never_raise(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    rec = read_tags(str(path))
    _assert_shape(rec)
    assert rec["error"] is None or isinstance(rec["error"], str)


def test_missing_file_and_bad_url():
    rec = read_tags("/no/such/file.flac")
    _assert_shape(rec)
    assert rec["error"].startswith("FileNotFoundError")
    assert read_tags("nosuchproto://x/y.mp3")["error"]


def test_partial_tags_kept_with_error(tmp_path):
    """tinytag fails on a short 'trkn' atom: the title read before it survives, with the error."""
    bad_trkn = _atom(b"trkn", _atom(b"data", b"\0" * 10))
    path = tmp_path / "partial.m4a"
    path.write_bytes(_mp4(_text_item(b"\xa9nam", "kept") + bad_trkn + _text_item(b"\xa9ART", "x")))
    rec = read_tags(str(path))
    _assert_shape(rec)
    assert rec["title"] == "kept"
    assert rec["error"].startswith("ParseError")


# --- normalisation ------------------------------------------------------------------------
def test_normalise_tag_values():
    assert normalise_tag_values("Rock; Pop") == ["rock", "pop"]
    assert normalise_tag_values(["ROCK", "pop ", "Rock"]) == ["rock", "pop"]
    assert normalise_tag_values("Jazz\x00Blues/Soul, Funk | Disco\\Dub") == [
        "jazz", "blues", "soul", "funk", "disco", "dub"]
    assert normalise_tag_values("Ｈｉｐ　 Ｈｏｐ；Ｒ＆Ｂ") == ["hip hop", "r&b"]
    assert normalise_tag_values("  Drum  and\tBass ") == ["drum and bass"]
    assert normalise_tag_values("Straße") == ["strasse"]
    assert normalise_tag_values(None) == [] and normalise_tag_values(["", " ; "]) == []
    assert normalise_tag_values([b"Caf\xc3\xa9", 12]) == ["café", "12"]


def test_split_keeps_names_whole():
    assert split_tag_values("AC/DC; Earth, Wind & Fire", NAME_SEPARATORS) == [
        "AC/DC", "Earth, Wind & Fire"]
    assert split_tag_values("Folk, World, & Country") == ["Folk", "World", "Country"]
