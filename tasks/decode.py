"""The one decode adapter: open an audio file (local path or fsspec URL) and read it in blocks.

Everything else in :mod:`tasks` is pure; this module is the only place that reads audio bytes.
Decoding goes through soundfile (libsndfile 1.2: wav, flac, ogg/vorbis, opus, mp3, aiff) and
always yields ``float32`` blocks shaped ``(channels, n)`` at the file's native rate, so a file of
any length is read in bounded memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import numpy as np
import soundfile as sf

from tasks.errors import DecodeError, SourceUnavailable
from tasks.limits import Deadline
from tasks.units import Hz

SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".wav": "wav",
    ".wave": "wav",
    ".flac": "flac",
    ".ogg": "ogg",
    ".oga": "ogg",
    ".opus": "opus",
    ".mp3": "mp3",
    ".aiff": "aiff",
    ".aif": "aiff",
    ".aifc": "aiff",
}
"""File extensions the pipeline decodes, and the format name recorded for each."""

DEFAULT_BLOCK_FRAMES = 1 << 18
"""Native-rate frames per decoded block (about 6 s at 44.1 kHz)."""


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio file.

    Attributes
    ----------
    sample_rate : int
        Native sampling rate in Hz.
    channels : int
        Number of channels.
    frames : int
        Frames per channel as the header states (may be an estimate for mp3).
    container : str
        libsndfile's format name (``WAV``, ``FLAC``, ``OGG``, ``MP3`` ...).
    subtype : str
        libsndfile's subtype (``PCM_16``, ``VORBIS``, ``FLOAT`` ...).
    """

    sample_rate: Hz
    channels: int
    frames: int
    container: str
    subtype: str

    @property
    def duration_s(self) -> float:
        """Duration implied by the header, in seconds."""
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def audio_format(uri: str) -> str | None:
    """Return the format name for ``uri``'s extension, or ``None`` if it is not supported."""
    return SUPPORTED_EXTENSIONS.get(os.path.splitext(uri)[1].lower())


@contextlib.contextmanager
def open_audio(uri: str) -> Iterator[sf.SoundFile]:
    """Open ``uri`` (a local path or any fsspec URL) for block reading.

    Raises
    ------
    SourceUnavailable
        If the file is gone or cannot be opened (tried again by the next run).
    DecodeError
        If the file is empty or not decodable audio.
    """
    handle: IO[bytes] | None = None
    target: Any = uri
    try:
        if "://" in uri and not uri.startswith("file://"):
            handle = fsspec.open(uri, "rb").open()
            target = handle
        elif uri.startswith("file://"):
            target = uri[len("file://"):]
        try:
            snd = sf.SoundFile(target)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            if isinstance(target, str) and not os.path.exists(target):
                raise SourceUnavailable("file is gone (deleted or moved since it was "
                                        "listed)") from exc
            raise DecodeError(_describe(exc, uri)) from exc
        except OSError as exc:
            raise SourceUnavailable(f"cannot open: {exc}") from exc
        with snd:
            if snd.samplerate <= 0 or snd.channels <= 0:
                raise DecodeError(
                    f"invalid header: {snd.samplerate} Hz, {snd.channels} channels"
                )
            yield snd
    finally:
        if handle is not None:
            handle.close()


def probe(uri: str) -> AudioInfo:
    """Read the header of ``uri``.

    Parameters
    ----------
    uri : str
        Local path or fsspec URL.

    Returns
    -------
    AudioInfo

    Raises
    ------
    DecodeError
        If the file cannot be opened as audio.
    """
    with open_audio(uri) as snd:
        return AudioInfo(snd.samplerate, snd.channels, int(snd.frames), snd.format, snd.subtype)


def read_blocks(snd: sf.SoundFile, block_frames: int = DEFAULT_BLOCK_FRAMES, *,
                deadline: Deadline | None = None) -> Iterator[np.ndarray]:
    """Yield the decoded audio of an open file in blocks.

    Parameters
    ----------
    snd : soundfile.SoundFile
        An open file (see :func:`open_audio`).
    block_frames : int > 0
        Frames per block at the native rate.
    deadline : Deadline, optional
        Checked before every block (the consumer's work on a block counts too).

    Yields
    ------
    np.ndarray [shape=(channels, n), dtype=float32]
        Consecutive blocks; ``n <= block_frames``.

    Raises
    ------
    DecodeError
        If decoding fails part-way (a truncated or corrupt stream).
    TimeLimitExceeded
        If ``deadline`` passes.
    """
    while True:
        if deadline:
            deadline.check()
        try:
            data = snd.read(block_frames, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise DecodeError(f"decoding failed after {snd.tell()} frames: {exc}") from exc
        if data.shape[0] == 0:
            return
        yield np.ascontiguousarray(data.T)
        if data.shape[0] < block_frames:
            return


TRUNCATION_TOLERANCE = 0.99
"""Decoded length below this share of the declared length marks a track truncated (an mp3
header's length is an estimate; one missing block of a longer file is not noise)."""
_OGG_TAIL_BYTES = 1 << 17


def declared_duration(uri: str, info: AudioInfo) -> tuple[float | None, str | None]:
    """How long the container says the audio is, and why it may be cut short.

    libsndfile reports a truncated WAV's or Ogg's length from the bytes that are there, so
    those containers are read directly: a WAV ``data`` chunk declares its size; an Ogg stream
    ends with a page flagged end-of-stream. For other formats the header's frame count is
    the declared length (mp3 with a Xing/VBRI header, FLAC's STREAMINFO; an mp3 with neither
    has no declared length to check against).

    Returns
    -------
    (float or None, str or None)
        Declared seconds (None if the container does not say), and a reason the stream is
        known to be cut short (None if not).
    """
    fmt = audio_format(uri)
    if fmt not in ("wav", "ogg", "opus"):
        return info.duration_s, None
    try:
        with _open_bytes(uri) as fh:
            if fmt == "wav":
                return _wav_declared(fh, info), None
            if fmt in ("ogg", "opus"):
                return info.duration_s, _ogg_tail_problem(fh)
    except OSError:
        return info.duration_s, None
    return info.duration_s, None


@contextlib.contextmanager
def _open_bytes(uri: str) -> Iterator[IO[bytes]]:
    if "://" in uri and not uri.startswith("file://"):
        with fsspec.open(uri, "rb") as fh:
            yield fh
    else:
        with open(uri.removeprefix("file://"), "rb") as fh:
            yield fh


def _wav_declared(fh: IO[bytes], info: AudioInfo) -> float | None:
    head = fh.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return info.duration_s
    block_align = 0
    for _ in range(64):  # chunks before "data": fmt, LIST, fact, ...
        chunk = fh.read(8)
        if len(chunk) < 8:
            return info.duration_s
        cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
        if cid == b"fmt ":
            fmt = fh.read(size + (size & 1))
            block_align = int.from_bytes(fmt[12:14], "little") if len(fmt) >= 14 else 0
        elif cid == b"data":
            if size in (0, 0xFFFFFFFF) or not block_align or not info.sample_rate:
                return info.duration_s  # streamed WAV or RF64: no usable size
            return size // block_align / info.sample_rate
        else:
            fh.seek(size + (size & 1), os.SEEK_CUR)
    return info.duration_s


def _ogg_tail_problem(fh: IO[bytes]) -> str | None:
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    fh.seek(max(0, end - _OGG_TAIL_BYTES))
    tail = fh.read()
    at = tail.rfind(b"OggS")
    if at < 0 or len(tail) - at < 27:
        return "no complete Ogg page at the end"
    n_segments = tail[at + 26]
    lacing = tail[at + 27: at + 27 + n_segments]
    if len(lacing) < n_segments or at + 27 + n_segments + sum(lacing) > len(tail):
        return "the last Ogg page is cut short"
    if not tail[at + 5] & 0x04:
        return "the Ogg stream has no end-of-stream page"
    return None


def _describe(exc: Exception, uri: str) -> str:
    text = str(exc).replace(repr(uri), "").replace(uri, "").strip(" :")
    text = text.removeprefix("Error opening").strip(" :")
    # libsndfile says this of an opened file whose bytes no decoder recognises (e.g. text
    # named .mp3); the file is there, so say what is wrong with it instead
    if "does not exist or is not a regular file" in text:
        text = "no decoder recognises its contents"
    return f"not decodable audio ({text or type(exc).__name__})"
