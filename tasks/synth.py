"""Labelled demo music rendered offline from the General MIDI soundfont, with no download.

This module exists so that demos, tests and benchmarks have realistic, *labelled* music to
work on: each clip is a short random-but-musical piece (a random key and mode, a common chord
progression, a melody walking over the scale, an accompaniment pattern, velocity and timing
variation) played by one known instrument in one known style. The note events are rendered
with ``tinysoundfont``'s offline synthesiser from the ``TimGM6mb.sf2`` soundfont that ships
inside the ``pretty_midi`` wheel.

It is a pure unit like the rest of :mod:`tasks`: arrays and small records out, no global
state, and it must not write files (callers decide where audio goes). Only the offline
rendering API of ``tinysoundfont`` is used, never its ``pyaudio`` playback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import ParameterError
from tasks.units import seconds_to_samples

__all__ = [
    "INSTRUMENTS",
    "STYLES",
    "demo_catalogue_plan",
    "render_track",
    "soundfont_path",
]

SOUNDFONT_NAME = "TimGM6mb.sf2"


@dataclass(frozen=True)
class Instrument:
    """How one labelled instrument is played.

    Attributes
    ----------
    program : int
        General MIDI program, 0-based (0 = Acoustic Grand Piano).
    low, high : int
        MIDI note range of the melody (the accompaniment sits about an octave lower).
    polyphonic : bool
        Whether the accompaniment may use block chords; single-line instruments get a second,
        softer single line (a duet) instead.
    """

    program: int
    low: int
    high: int
    polyphonic: bool


@dataclass(frozen=True)
class Style:
    """Tempo, rhythm, articulation, register and drums of one style.

    Attributes
    ----------
    tempo : tuple of float
        Range of tempi in beats per minute, drawn uniformly.
    rhythms : tuple of tuple of float
        One-bar melody rhythms, in beats (each sums to 4).
    articulation : float
        Sounding length as a fraction of the written length (above 1: legato overlap).
    accompaniment : str
        ``"arpeggio"``, ``"oompah"`` or ``"offbeat"``.
    velocity : int
        Mean MIDI velocity of the melody.
    register : int
        Semitone shift of the melody's centre relative to the instrument's range centre.
    drums : bool
        Whether a drum kit plays on General MIDI channel 10.
    """

    tempo: tuple[float, float]
    rhythms: tuple[tuple[float, ...], ...]
    articulation: float
    accompaniment: str
    velocity: int
    register: int
    drums: bool


#: Label -> General MIDI program (0-based). Chosen to sound clearly different.
INSTRUMENTS: dict[str, int] = {
    "piano": 0,  # Acoustic Grand Piano
    "guitar": 24,  # Acoustic Guitar (nylon)
    "violin": 40,  # Violin
    "trumpet": 56,  # Trumpet
    "flute": 73,  # Flute
    "organ": 16,  # Drawbar Organ
}

_PLAYING: dict[str, Instrument] = {
    "piano": Instrument(INSTRUMENTS["piano"], 55, 88, polyphonic=True),
    "guitar": Instrument(INSTRUMENTS["guitar"], 52, 79, polyphonic=True),
    "violin": Instrument(INSTRUMENTS["violin"], 60, 91, polyphonic=False),
    "trumpet": Instrument(INSTRUMENTS["trumpet"], 55, 82, polyphonic=False),
    "flute": Instrument(INSTRUMENTS["flute"], 65, 96, polyphonic=False),
    "organ": Instrument(INSTRUMENTS["organ"], 53, 84, polyphonic=True),
}

#: Style name -> how it is played.
STYLES: dict[str, Style] = {
    "ballad": Style(
        tempo=(58.0, 80.0),
        rhythms=((2, 2), (1, 1, 2), (3, 1), (4,), (1.5, 0.5, 2), (2, 1, 1)),
        articulation=1.05,
        accompaniment="arpeggio",
        velocity=62,
        register=-3,
        drums=False,
    ),
    "march": Style(
        tempo=(100.0, 120.0),
        rhythms=((1, 1, 1, 1), (0.75, 0.25, 1, 2), (1, 0.5, 0.5, 1, 1), (2, 1, 1),
                 (0.75, 0.25, 0.75, 0.25, 2)),
        articulation=0.45,
        accompaniment="oompah",
        velocity=88,
        register=0,
        drums=False,
    ),
    "dance": Style(
        tempo=(118.0, 134.0),
        rhythms=((0.5,) * 8, (0.75, 0.75, 0.5, 0.5, 0.5, 1), (1, 0.5, 0.5, 1, 1),
                 (0.5, 1, 0.5, 0.5, 1, 0.5)),
        articulation=0.6,
        accompaniment="offbeat",
        velocity=96,
        register=4,
        drums=True,
    ),
}

_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)
# Progressions as 0-based scale degrees, one chord per bar.
_PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 0), (0, 5, 3, 4), (1, 4, 0, 0), (0, 3, 0, 4)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 4), (0, 3, 6, 2)),
}
_KICK, _SNARE, _HAT_CLOSED, _HAT_OPEN = 36, 38, 42, 46
_MELODY, _ACCOMP, _DRUMS = 0, 1, 9  # MIDI channels, 0-based (9 = GM channel 10)

# One note event: (time in seconds, sort key, channel, key, velocity); velocity 0 = note off.
_Event = tuple[float, int, int, int, int]


def soundfont_path() -> Path:
    """Locate the General MIDI soundfont shipped inside the ``pretty_midi`` package.

    Returns
    -------
    pathlib.Path
        Path of ``TimGM6mb.sf2``.

    Raises
    ------
    FileNotFoundError
        If ``pretty_midi`` is installed without its soundfont (the message names the path).
    """
    import pretty_midi

    path = Path(pretty_midi.__file__).resolve().parent / SOUNDFONT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"General MIDI soundfont not found at {path}; reinstall pretty_midi from its wheel"
        )
    return path


def _check_choice(kind: str, value: str, options: dict) -> None:
    if value not in options:
        raise ParameterError(f"unknown {kind} {value!r}; expected one of {sorted(options)}")


def _scale_notes(tonic: int, mode: str) -> np.ndarray:
    """All MIDI notes of the key from 0 to 127, ascending."""
    steps = _MAJOR if mode == "major" else _MINOR
    notes = [octave * 12 + tonic + s for octave in range(-1, 11) for s in steps]
    return np.array(sorted(n for n in notes if 0 <= n <= 127))


def _chord(tonic: int, mode: str, degree: int) -> list[int]:
    """Pitch classes of the diatonic triad on ``degree`` (root, third, fifth)."""
    steps = _MAJOR if mode == "major" else _MINOR
    return [(tonic + steps[(degree + k) % 7]) % 12 for k in (0, 2, 4)]


def _voice(pitch_classes: list[int], low: int) -> list[int]:
    """The chord's pitch classes voiced upward from the first one at or above ``low``."""
    root = low + (pitch_classes[0] - low) % 12
    out = [root]
    for pc in pitch_classes[1:]:
        out.append(out[-1] + (pc - out[-1]) % 12)
    return out


def _compose(instrument: str, style: str, seconds: float,
             rng: np.random.Generator) -> list[_Event]:
    """Note events (time-sorted) of a random piece at least ``seconds`` long."""
    inst, sty = _PLAYING[instrument], STYLES[style]
    mode = "major" if rng.random() < 0.6 else "minor"
    tonic = int(rng.integers(0, 12))
    progression = _PROGRESSIONS[mode][int(rng.integers(len(_PROGRESSIONS[mode])))]
    beat = 60.0 / rng.uniform(*sty.tempo)
    bar = 4 * beat
    n_bars = math.ceil(seconds / bar) + 1
    scale = _scale_notes(tonic, mode)

    # Register: the melody lives in a random ~1.5-octave window inside the instrument's range.
    centre = (inst.low + inst.high) / 2 + sty.register + rng.integers(-5, 6)
    lo = int(np.clip(centre - 9, inst.low, inst.high - 12))
    hi = int(np.clip(centre + 9, lo + 12, inst.high))
    mel_scale = scale[(scale >= lo) & (scale <= hi)]
    acc_low = max(lo - 12 - int(rng.integers(0, 6)), 28)

    velocity = sty.velocity + rng.normal(0, 6)
    swing = rng.uniform(0.0, 0.012)  # seconds of timing jitter (humanisation)
    events: list[_Event] = []

    def note(t: float, dur: float, chan: int, key: int, vel: float) -> None:
        t = max(0.0, t + (rng.normal(0, swing) if t > 0 else 0.0))
        v = int(np.clip(round(vel + rng.normal(0, 7)), 15, 127))
        key = int(np.clip(key, 0, 127))
        events.append((t, 1, chan, key, v))
        events.append((t + max(dur, 0.03), 0, chan, key, 0))  # offs sort before ons

    idx = int(np.searchsorted(mel_scale, (lo + hi) / 2))
    for b in range(n_bars):
        t0 = b * bar
        degree = progression[b % len(progression)]
        pcs = _chord(tonic, mode, degree)
        # Melody: a weighted random walk over the scale, pulled to chord tones on the downbeat.
        rhythm = sty.rhythms[int(rng.integers(len(sty.rhythms)))]
        pos = 0.0
        for k, length in enumerate(rhythm):
            step = rng.choice([-3, -2, -1, 0, 1, 2, 3], p=[.06, .14, .26, .08, .26, .14, .06])
            idx = int(np.clip(idx + step, 0, mel_scale.size - 1))
            if k == 0:
                tones = [i for i, n in enumerate(mel_scale) if n % 12 in pcs]
                if tones:
                    idx = min(tones, key=lambda i: abs(i - idx))
            accent = 10 if pos in (0.0, 2.0) else 0
            if not (k > 0 and rng.random() < 0.07):  # occasional rest
                note(t0 + pos * beat, length * beat * sty.articulation, _MELODY,
                     int(mel_scale[idx]), velocity + accent)
            pos += length

        # Accompaniment, softer and lower.
        chord = _voice(pcs, acc_low)
        soft = velocity - 18
        if sty.accompaniment == "arpeggio":
            if inst.polyphonic and rng.random() < 0.5:
                for key in chord:
                    note(t0, bar * 1.02, _ACCOMP, key, soft)
            else:
                pattern = [*chord, chord[0] + 12, chord[2], chord[1], chord[0], chord[1]]
                for k, key in enumerate(pattern):
                    note(t0 + k * beat / 2, beat * 1.2, _ACCOMP, key, soft - 4)
        elif sty.accompaniment == "oompah":
            for k in range(4):
                if k % 2 == 0:
                    note(t0 + k * beat, beat * 0.45, _ACCOMP, chord[0] - 12 * (k == 0), soft + 4)
                elif inst.polyphonic:
                    for key in chord[1:]:
                        note(t0 + k * beat, beat * 0.35, _ACCOMP, key, soft)
                else:
                    note(t0 + k * beat, beat * 0.35, _ACCOMP, chord[1 + k // 2 % 2], soft)
        else:  # offbeat stabs
            for k in range(4):
                keys = chord if inst.polyphonic else [chord[(k % 2) * 2]]
                for key in keys:
                    note(t0 + (k + 0.5) * beat, beat * 0.3, _ACCOMP, key, soft)

        if sty.drums:
            for k in range(8):
                t = t0 + k * beat / 2
                if k % 2 == 0:
                    note(t, 0.1, _DRUMS, _KICK, 100)
                if k in (2, 6):
                    note(t, 0.1, _DRUMS, _SNARE, 92)
                hat = _HAT_OPEN if (k == 7 and rng.random() < 0.5) else _HAT_CLOSED
                note(t, 0.08, _DRUMS, hat, 62 + 14 * (k % 2 == 0))

    events.sort()
    return events


def render_track(instrument: str, style: str, *, seconds: float, sample_rate: int = 22050,
                 seed: int) -> np.ndarray:
    """Render one labelled clip: a random piece for ``instrument`` in ``style``.

    The piece (key, mode, chord progression, tempo, register, melody, velocities, timing
    jitter, stereo pan) is drawn from ``seed`` alone, so the same seed played by two
    instruments gives the same notes in two timbres. The note events are rendered with
    ``tinysoundfont``'s offline synthesiser, buffer by buffer between events.

    Parameters
    ----------
    instrument : str
        A key of :data:`INSTRUMENTS`.
    style : str
        A key of :data:`STYLES`.
    seconds : float > 0
        Length of the clip; notes still sounding at the end are cut (with a 10 ms fade).
    sample_rate : int > 0
        Output sampling rate in Hz.
    seed : int
        Seed of the random piece; the output is identical for identical arguments.

    Returns
    -------
    np.ndarray [shape=(2, n), dtype=float32]
        Stereo audio, time on the last axis, ``n = seconds_to_samples(seconds,
        sample_rate)``, peak-normalised to 0.8.

    Raises
    ------
    ParameterError
        (a ``ValueError``) for an unknown instrument or style, or a non-positive length or
        rate.
    FileNotFoundError
        If the ``pretty_midi`` soundfont is missing.
    """
    import tinysoundfont

    _check_choice("instrument", instrument, INSTRUMENTS)
    _check_choice("style", style, STYLES)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ParameterError(f"seconds must be a positive finite number, got {seconds!r}")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ParameterError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    n = seconds_to_samples(seconds, sample_rate)
    if n == 0:
        raise ParameterError(f"{seconds} s at {sample_rate} Hz is shorter than one sample")

    rng = np.random.default_rng(seed)
    events = _compose(instrument, style, seconds, rng)

    synth = tinysoundfont.Synth(samplerate=sample_rate)
    sfid = synth.sfload(soundfont_path().read_bytes())
    program = INSTRUMENTS[instrument]
    for chan in (_MELODY, _ACCOMP):
        synth.program_select(chan, sfid, 0, program)
        synth.control_change(chan, 10, int(rng.integers(40, 89)))  # pan
    synth.control_change(_ACCOMP, 11, 100)  # expression: accompaniment a little quieter
    if STYLES[style].drums:
        synth.program_select(_DRUMS, sfid, 0, 0, is_drums=True)
        synth.control_change(_DRUMS, 7, 80)  # keep the kit under the instrument

    buf = memoryview(bytearray(n * 2 * 4))  # interleaved stereo float32
    done = 0
    for t, _, chan, key, vel in events:
        at = min(seconds_to_samples(t, sample_rate), n)
        if at > done:
            synth.generate_simple(at - done, buffer=buf[done * 8 : at * 8])
            done = at
        if done >= n:
            break
        if vel:
            synth.noteon(chan, key, vel)
        else:
            synth.noteoff(chan, key)
    if done < n:
        synth.generate_simple(n - done, buffer=buf[done * 8 :])

    y = np.frombuffer(buf, dtype=np.float32).reshape(n, 2).T.copy()
    fade = min(n, sample_rate // 100)
    y[:, n - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    peak = float(np.max(np.abs(y)))
    if peak > 0:
        y *= np.float32(0.8 / peak)
    return y


def demo_catalogue_plan(n_tracks: int, *, seed: int) -> list[dict]:
    """Plan a balanced labelled demo catalogue (what to render, not the audio).

    Rows cycle through every (instrument, style) pair in a seeded random order, so every pair
    occurs ``n_tracks // (len(INSTRUMENTS) * len(STYLES))`` or one more times, and the
    instrument counts (and the style counts) differ by at most one.

    Parameters
    ----------
    n_tracks : int >= 0
        Number of rows.
    seed : int
        Seed of the plan (pair order, per-track seeds and durations).

    Returns
    -------
    list of dict
        One dict per track with keys ``instrument`` (str), ``style`` (str), ``seed`` (int,
        for :func:`render_track`), ``seconds`` (float, 4 to 20, to 0.1 s) and ``stem``
        (str, e.g. ``"piano/ballad_0007"``; unique, the index is the row number).

    Raises
    ------
    ParameterError
        If ``n_tracks`` is negative.
    """
    if n_tracks < 0:
        raise ParameterError(f"n_tracks must be >= 0, got {n_tracks}")
    rng = np.random.default_rng(seed)
    instruments, styles = list(INSTRUMENTS), list(STYLES)
    rows: list[dict] = []
    while len(rows) < n_tracks:
        # One cycle visits every pair once, in blocks that each hold every instrument once
        # (styles rotate across blocks), so any prefix is balanced within one per label.
        order = rng.permutation(len(instruments))
        shift = rng.permutation(len(styles))
        cycle = [(instruments[order[i]], styles[shift[(i + j) % len(styles)]])
                 for j in range(len(styles)) for i in range(len(instruments))]
        for instrument, style in cycle:
            if len(rows) == n_tracks:
                break
            rows.append({
                "instrument": instrument,
                "style": style,
                "seed": int(rng.integers(0, 2**31 - 1)),
                "seconds": round(float(rng.uniform(4.0, 20.0)), 1),
                "stem": f"{instrument}/{style}_{len(rows):04d}",
            })
    return rows
