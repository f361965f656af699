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

from tasks.errors import DecodeError
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
    DecodeError
        If the file is missing, empty, or not decodable audio.
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
            raise DecodeError(_describe(exc, uri)) from exc
        except OSError as exc:
            raise DecodeError(f"cannot open: {exc}") from exc
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


def read_blocks(snd: sf.SoundFile, block_frames: int = DEFAULT_BLOCK_FRAMES
                ) -> Iterator[np.ndarray]:
    """Yield the decoded audio of an open file in blocks.

    Parameters
    ----------
    snd : soundfile.SoundFile
        An open file (see :func:`open_audio`).
    block_frames : int > 0
        Frames per block at the native rate.

    Yields
    ------
    np.ndarray [shape=(channels, n), dtype=float32]
        Consecutive blocks; ``n <= block_frames``.

    Raises
    ------
    DecodeError
        If decoding fails part-way (a truncated or corrupt stream).
    """
    while True:
        try:
            data = snd.read(block_frames, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise DecodeError(f"decoding failed after {snd.tell()} frames: {exc}") from exc
        if data.shape[0] == 0:
            return
        yield np.ascontiguousarray(data.T)
        if data.shape[0] < block_frames:
            return


def _describe(exc: Exception, uri: str) -> str:
    text = str(exc).replace(repr(uri), "").replace(uri, "").strip(" :")
    text = text.removeprefix("Error opening").strip(" :")
    # libsndfile says this of an opened file whose bytes no decoder recognises (e.g. text
    # named .mp3); the file is there, so say what is wrong with it instead
    if "does not exist or is not a regular file" in text:
        text = "no decoder recognises its contents"
    return f"not decodable audio ({text or type(exc).__name__})"
