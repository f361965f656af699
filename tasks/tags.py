"""Embedded metadata tags: one flat record per file, read with tinytag; never raises.

:func:`read_tags` reads ID3 (v1, v2.2-2.4, also inside WAV and before FLAC), Vorbis comments
(FLAC, Ogg Vorbis, Opus), MP4/M4A ``ilst`` atoms (including iTunes ``----`` freeform atoms),
RIFF ``INFO`` chunks, ASF and AIFF through ``tinytag`` 2.x (MIT, pure Python, no native
code). Only tags are parsed (no duration scan, no images), so a call reads the file's header
region and, for MP3, its last 128 bytes.

Every record has every key of :data:`TAG_FIELDS` (``None`` or ``[]`` when absent). Missing
files, unsupported or malformed files and broken tags never raise: the record holds what was
read and ``error`` says what went wrong (``None`` when nothing did). Text is whatever the tag
says, decoded by tinytag with replacement characters for invalid bytes, NUL padding removed and
Unicode normalised to NFC.

MusicBrainz identifiers follow Picard's mapping: the recording id is ID3 ``UFID`` with owner
``http://musicbrainz.org`` or ``TXXX:MusicBrainz Track Id``, Vorbis ``MUSICBRAINZ_TRACKID``
and MP4 ``----:com.apple.iTunes:MusicBrainz Track Id``; the release track id is ``MusicBrainz
Release Track Id``/``MUSICBRAINZ_RELEASETRACKID``; and so on for album (release), release
group, artist, album artist and work.

:func:`normalise_tag_values` turns raw values into label strings (for labels from tags):
Unicode NFKC, case-folded, whitespace collapsed, multi-valued strings split.

No GPL code is imported here (mutagen, which the tests use to *write* tags, is GPL and stays
in the tests).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

__all__ = ["LABEL_SEPARATORS", "NAME_SEPARATORS", "TAG_FIELDS", "normalise_tag_values",
           "read_tags", "split_tag_values"]

TAG_FIELDS: tuple[str, ...] = (
    "title",
    "artist",
    "artists",
    "album",
    "album_artist",
    "composer",
    "genre",
    "date",
    "year",
    "track_number",
    "track_total",
    "disc_number",
    "disc_total",
    "isrc",
    "musicbrainz_recording_id",
    "musicbrainz_track_id",
    "musicbrainz_release_id",
    "musicbrainz_release_group_id",
    "musicbrainz_artist_id",
    "musicbrainz_album_artist_id",
    "musicbrainz_work_id",
    "error",
)
"""Keys of every :func:`read_tags` record. ``genre``, ``artists``,
``musicbrainz_artist_id`` and ``musicbrainz_album_artist_id`` are lists of str; ``year``,
``track_number``, ``track_total``, ``disc_number``, ``disc_total`` are int or None; the rest
str or None."""

_LIST_FIELDS = frozenset(
    {"genre", "artists", "musicbrainz_artist_id", "musicbrainz_album_artist_id"})

#: separators between values of a multi-valued string: NUL (ID3v2.4), ';', '/', ',', '|',
#: backslash, and the full-width / ideographic forms of ';', '/', ','
LABEL_SEPARATORS = "\x00;/,|\\\uff1b\uff0f\uff0c\u3001"
#: the unambiguous ones, for names ("AC/DC", "Earth, Wind & Fire" stay whole)
NAME_SEPARATORS = "\x00;\uff1b"
_SPACE = re.compile(r"\s+")
_YEAR = re.compile(r"(?<!\d)(\d{4})(?!\d)")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# tinytag's "other" keys, normalised (lower case, no spaces, '_' or '-'), -> our field
_MUSICBRAINZ_KEYS = {
    "musicbrainztrackid": "musicbrainz_recording_id",
    "musicbrainzrecordingid": "musicbrainz_recording_id",
    "musicbrainzreleasetrackid": "musicbrainz_track_id",
    "musicbrainzalbumid": "musicbrainz_release_id",
    "musicbrainzreleaseid": "musicbrainz_release_id",
    "musicbrainzreleasegroupid": "musicbrainz_release_group_id",
    "musicbrainzartistid": "musicbrainz_artist_id",
    "musicbrainzalbumartistid": "musicbrainz_album_artist_id",
    "musicbrainzreleaseartistid": "musicbrainz_album_artist_id",
    "musicbrainzworkid": "musicbrainz_work_id",
}


def split_tag_values(values: Any, separators: str = LABEL_SEPARATORS) -> list[str]:
    """Split multi-valued tag text into clean values, keeping their case.

    Parameters
    ----------
    values : str, iterable of str, or None
        One or more raw values (anything else is turned into ``str``).
    separators : str
        Characters that separate values (default :data:`LABEL_SEPARATORS`: NUL, ``;``,
        ``/``, ``,``, ``|``, backslash and full-width forms; :data:`NAME_SEPARATORS` for
        names).

    Returns
    -------
    list of str
        Values NFC-normalised, whitespace collapsed and stripped (with stray quotes and a
        leading ``&``), empty ones dropped, duplicates (ignoring case) dropped, first seen
        first.
    """
    split = re.compile("[" + re.escape(separators) + "]+")
    out: list[str] = []
    seen: set[str] = set()
    for raw in _as_list(values):
        text = unicodedata.normalize("NFC", raw)
        for part in split.split(text):
            clean = _SPACE.sub(" ", part).strip().strip("\"'").lstrip("&").strip()
            key = clean.casefold()
            if clean and key not in seen:
                seen.add(key)
                out.append(clean)
    return out


def normalise_tag_values(values: Any, separators: str = LABEL_SEPARATORS) -> list[str]:
    r"""Label strings from raw tag values: split, NFKC, case-folded, spacing collapsed.

    ``"Rock; Pop"``, ``["ROCK", "pop "]`` and ``"Rock\x00Pop"`` all give
    ``["rock", "pop"]``; full-width letters become ASCII (NFKC), ``"Hip  Hop"`` becomes
    ``"hip hop"``. Order is first seen first, duplicates are dropped.

    Parameters
    ----------
    values : str, iterable of str, or None
    separators : str
        As in :func:`split_tag_values`.

    Returns
    -------
    list of str
    """
    out: list[str] = []
    for value in split_tag_values(values, separators):
        label = _SPACE.sub(" ", unicodedata.normalize("NFKC", value).casefold()).strip()
        if label and label not in out:
            out.append(label)
    return out


def read_tags(uri: str) -> dict[str, Any]:
    """Read the embedded tags of one audio file (a local path or an fsspec URL).

    Parameters
    ----------
    uri : str

    Returns
    -------
    dict
        Every key of :data:`TAG_FIELDS`; ``error`` is ``None`` or ``"<ExceptionType>:
        message"`` when the file could not be opened or its tags could not be parsed (the
        other keys then hold whatever was read before the failure).
    """
    record = _empty()
    try:
        import tinytag
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        record["error"] = f"ImportError: {exc}"
        return record
    try:
        with _open(uri) as fh:
            tag = None
            try:
                tag = tinytag.TinyTag.get(filename=_name_hint(uri), file_obj=fh, tags=True,
                                          duration=False, image=False)
            except tinytag.TinyTagException as exc:
                record["error"] = _describe(exc)
                tag = _salvage(tinytag, uri, fh)
            if tag is not None:
                _fill(record, tag)
    except Exception as exc:  # a catalogue scan must go on, whatever the file
        if record["error"] is None:
            record["error"] = _describe(exc)
    return record


# ----------------------------------------------------------------------------------------
def _empty() -> dict[str, Any]:
    return {k: ([] if k in _LIST_FIELDS else None) for k in TAG_FIELDS}


def _describe(exc: BaseException) -> str:
    text = str(exc) or str(exc.__cause__ or "")
    return f"{type(exc).__name__}: {text}"[:500]


def _name_hint(uri: str) -> str:
    """The path part of ``uri``: tinytag picks its parser by extension first."""
    return uri.split("?", 1)[0]


def _open(uri: str) -> Any:
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return open(os.fspath(path), "rb")  # the caller closes it (with)
    import fsspec

    return fsspec.open(uri, "rb").open()


def _salvage(tinytag: Any, uri: str, fh: Any) -> Any:
    """After a parse error, parse again keeping the half-filled tag object (private API).

    ``TinyTag.get`` drops what it had read when a parser fails; this repeats its steps with
    tinytag 2.x's internals so that the fields read before the failure are not lost. If the
    internals differ (another tinytag version), nothing is salvaged.
    """
    try:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(0)
        parser = tinytag.TinyTag._get_parser_class(_name_hint(uri), fh)
        tag = parser()
        tag._filehandler = fh
        tag.filename = _name_hint(uri)
        tag.filesize = size
        fh.seek(0)
        try:
            tag._load(tags=True, duration=False, image=False)
        except Exception:  # the error is already recorded
            pass
        return tag
    except Exception:  # another tinytag version: salvage nothing
        return None


def _as_list(values: Any) -> list[str]:
    if values is None:
        return []
    if isinstance(values, bytes):
        return [values.decode("utf-8", "replace")]
    if isinstance(values, str):
        return [values]
    if isinstance(values, Iterable):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in values if v is not None]
    return [str(values)]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = _SPACE.sub(" ", unicodedata.normalize("NFC", str(value)).replace("\x00", " "))
    text = text.strip()
    return text or None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if value is None:
        return None
    m = re.match(r"\s*(\d+)", str(value))
    return int(m.group(1)) if m else None


def _fill(record: dict[str, Any], tag: Any) -> None:
    """Copy a tinytag object's fields into ``record`` (defensively: any attribute may lack)."""
    other: dict[str, list[str]] = {}
    for key, vals in (getattr(tag, "other", None) or {}).items():
        other.setdefault(_norm_key(str(key)), []).extend(_as_list(vals))

    def first_and_more(attr: str, other_key: str) -> list[str]:
        return _as_list(getattr(tag, attr, None)) + other.get(other_key, [])

    record["title"] = _text(getattr(tag, "title", None))
    artists = split_tag_values(first_and_more("artist", "artist"), NAME_SEPARATORS)
    record["artist"] = _text(getattr(tag, "artist", None))
    record["artists"] = artists
    record["album"] = _text(getattr(tag, "album", None))
    record["album_artist"] = _text(getattr(tag, "albumartist", None))
    record["composer"] = _text(getattr(tag, "composer", None))
    record["genre"] = split_tag_values(first_and_more("genre", "genre"))
    date = _text(getattr(tag, "year", None))
    record["date"] = date
    m = _YEAR.search(date or "")
    record["year"] = int(m.group(1)) if m and 1000 <= int(m.group(1)) <= 2999 else None
    record["track_number"] = _int(getattr(tag, "track", None))
    record["track_total"] = _int(getattr(tag, "track_total", None))
    record["disc_number"] = _int(getattr(tag, "disc", None))
    record["disc_total"] = _int(getattr(tag, "disc_total", None))
    isrc = [v for v in split_tag_values(other.get("isrc", [])) if v]
    record["isrc"] = isrc[0].upper().replace("-", "") if isrc else None
    for key, field in _MUSICBRAINZ_KEYS.items():
        ids = _ids(other.get(key, []))
        if not ids:
            continue
        if field in _LIST_FIELDS:
            record[field] += [i for i in ids if i not in record[field]]
        elif record[field] is None:
            record[field] = ids[0]
    for ufid in other.get("ufid", []):  # ID3 UFID: owner NUL identifier
        owner, _, ident = ufid.partition("\x00")
        ids = _ids([ident])
        if "musicbrainz" in owner.lower() and ids and record["musicbrainz_recording_id"] is None:
            record["musicbrainz_recording_id"] = ids[0]


def _norm_key(key: str) -> str:
    return re.sub(r"[\s_\-]+", "", key.lower())


def _ids(values: list[str]) -> list[str]:
    """MusicBrainz identifiers (UUIDs, lower case) found in ``values``, in order."""
    out: list[str] = []
    for v in values:
        for m in _UUID.finditer(v):
            i = m.group(0).lower()
            if i not in out:
                out.append(i)
    return out
