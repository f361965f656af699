"""The frame-level features on a torch device (a GPU), in batches, and which extractor to use.

:class:`TorchSpectralExtractor` is a :class:`~tasks.features.SpectralExtractor` whose
:meth:`~TorchSpectralExtractor.frames` computes every field with torch on ``device``: the same
framing (frame ``j`` is ``buf[j*hop : j*hop + n_fft]``, padding already applied by the caller),
the same periodic window, a real FFT of each windowed frame, and the same librosa filter banks
(built once by the parent class, copied to the device once). It returns the same numpy
:class:`~tasks.features.FrameFeatures` (float32, same shapes), so
:class:`~tasks.segment.SegmentStream` and :func:`~tasks.track.extract_track` use it unchanged.
:meth:`~TorchSpectralExtractor.frames_batch` puts many buffers (segments, chunks of several
tracks) through one set of kernel launches, with one host-to-device copy of the samples and one
device-to-host copy of all results per batch.

Differences from the numpy path are float rounding only (``tests/tasks/test_torch_features.py``
states the tolerances): the FFT is another implementation (cuFFT, or torch's own on the CPU),
matrix products sum in another order, and the rolloff's cumulative sum runs in float64
(the numpy kernel sums float32 sequentially, which a parallel scan cannot reproduce), so in
rare frames whose running sum lands within rounding of the 85 % threshold the rolloff moves
by one bin. Matrix products run at full float32 precision whatever
``torch.set_float32_matmul_precision`` the process has set (TF32 would cost about 1e-3
relative in the mel bands).

:func:`make_extractor` picks the extractor: ``device`` argument, else the environment variable
``MTAG_FEATURE_DEVICE``, else ``"auto"``; ``auto`` is CUDA when torch sees a device, else the
numpy :class:`~tasks.features.SpectralExtractor`. The device is not part of
:class:`~tasks.config.FeatureConfig` (outputs agree within tolerance, so the feature-set id does
not change). ``auto`` looks for a GPU cheaply before importing torch (about 2-3 s per worker
process): torch already imported, or an NVIDIA device node, driver or ``nvidia-smi``; on a
machine with none of them it returns the numpy extractor without importing torch.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.config import FeatureConfig
from tasks.errors import ParameterError
from tasks.features import SCALAR_FEATURES, FrameFeatures, SpectralExtractor

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FEATURE_DEVICE_ENV = "MTAG_FEATURE_DEVICE"
"""Environment variable that chooses the feature device: ``auto`` (default), ``cpu``, ``cuda``
or ``cuda:N``."""

MAX_BATCH_FRAMES = 32768
"""Frames computed per set of kernel launches (about 12 minutes of audio at 22,050 Hz with a
512 hop); a larger batch is split. About 0.8 GB of device temporaries at n_fft 2048."""

_TINY32 = float(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------------------
# selection
def gpu_possible() -> bool:
    """Cheap test, without importing torch, of whether this process could see a CUDA device.

    True when torch is already imported (then asking it costs nothing), else when an NVIDIA
    device node (``/dev/nvidia0`` ...), the kernel driver (``/proc/driver/nvidia``), WSL's GPU
    node (``/dev/dxg``) or ``nvidia-smi`` is present; False when ``CUDA_VISIBLE_DEVICES`` hides
    every device (``""`` or ``-1``).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if "torch" in sys.modules:
        return True
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/proc/driver/nvidia/version")
                or os.path.exists("/dev/dxg") or shutil.which("nvidia-smi"))


def resolve_device(device: str | None = None) -> str:
    """The feature device to use: ``"cpu"`` (the numpy extractor) or a CUDA device.

    Parameters
    ----------
    device : str, optional
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``None`` reads
        :data:`FEATURE_DEVICE_ENV`, and ``"auto"`` when that is unset or empty.

    Returns
    -------
    str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ParameterError
        For an unknown name, or a CUDA device that this process cannot use.
    """
    source = "argument"
    if device is None:
        device, source = os.environ.get(FEATURE_DEVICE_ENV, ""), FEATURE_DEVICE_ENV
    choice = device.strip().lower() or "auto"
    if choice == "cpu":
        return "cpu"
    if choice == "auto":
        if not gpu_possible():
            return "cpu"
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice != "cuda" and not re.fullmatch(r"cuda:\d+", choice):
        raise ParameterError(f"feature device {device!r} ({source}): use auto, cpu, cuda or "
                             "cuda:N")
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        raise ParameterError(
            f"feature device {device!r} ({source}): torch {torch.__version__} sees no CUDA "
            f"device (its CUDA: {built}); use {FEATURE_DEVICE_ENV}=auto or cpu")
    count = torch.cuda.device_count()
    if ":" in choice and int(choice.split(":")[1]) >= count:
        raise ParameterError(f"feature device {device!r} ({source}): only {count} CUDA "
                             f"device(s) visible")
    return choice


def make_extractor(config: FeatureConfig, device: str | None = None) -> SpectralExtractor:
    """The extractor for ``config`` on the chosen device (see :func:`resolve_device`).

    Returns
    -------
    SpectralExtractor
        The numpy :class:`~tasks.features.SpectralExtractor` for ``"cpu"``, else a
        :class:`TorchSpectralExtractor` on the CUDA device.
    """
    resolved = resolve_device(device)
    if resolved == "cpu":
        log.debug("feature device: cpu (numpy)")
        return SpectralExtractor(config)
    log.info("feature device: %s (torch)", resolved)
    return TorchSpectralExtractor(config, resolved)


# ----------------------------------------------------------------------------------------
class TorchSpectralExtractor(SpectralExtractor):
    """Every frame-level feature with torch on ``device``, one buffer or a batch at a time.

    Parameters
    ----------
    config : FeatureConfig
    device : str or torch.device
        ``"cuda"``, ``"cuda:N"``, or ``"cpu"`` (torch on the CPU: for tests and comparisons;
        the numpy parent is faster there).
    max_batch_frames : int
        Frames per set of kernel launches; larger batches, and longer buffers, are split
        (bounds device memory).
    """

    def __init__(self, config: FeatureConfig, device: Any = "cpu", *,
                 max_batch_frames: int = MAX_BATCH_FRAMES) -> None:
        import torch

        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ParameterError(f"device {device!r}: {exc}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ParameterError(f"device {device!r}: torch sees no CUDA device")
        if self.device.type not in ("cuda", "cpu"):
            raise ParameterError(f"device {device!r}: only cuda and cpu are supported")
        self.max_batch_frames = max(1, int(max_batch_frames))
        self.fallbacks = 0  # batches computed by the numpy parent after a device OOM
        self._t: dict[str, torch.Tensor] | None = None
        super().__init__(config)  # numpy banks; its silence frame already comes from torch

    # ------------------------------------------------------------------------------------
    def frames(self, buf: np.ndarray, n_frames: int, *, zcr_buf: np.ndarray | None = None
               ) -> FrameFeatures:
        """Features of frames ``0 .. n_frames-1`` of ``buf``, as the numpy parent's.

        See :meth:`tasks.features.SpectralExtractor.frames`; a batch of one.
        """
        return self.frames_batch([buf], [n_frames], zcr_bufs=[zcr_buf])[0]

    def frames_batch(self, bufs: Sequence[np.ndarray], n_frames: Sequence[int], *,
                     zcr_bufs: Sequence[np.ndarray | None] | None = None
                     ) -> list[FrameFeatures]:
        """Features of many buffers through one set of kernel launches.

        Parameters
        ----------
        bufs : sequence of np.ndarray [shape=(n_i,)]
            Padded sample buffers, as for :meth:`frames` (converted to float32).
        n_frames : sequence of int > 0
            Frames to compute from each buffer.
        zcr_bufs : sequence of (np.ndarray or None), optional
            Edge-padded copies for the zero-crossing rate, per buffer (``None``: the buffer).

        Returns
        -------
        list of FrameFeatures
            One per buffer, in order; every field its own contiguous float32 array.
        """
        if len(bufs) != len(n_frames):
            raise ValueError(f"{len(bufs)} buffers but {len(n_frames)} frame counts")
        zs: Sequence[np.ndarray | None] = zcr_bufs if zcr_bufs is not None else [None] * len(bufs)
        if len(zs) != len(bufs):
            raise ValueError(f"{len(bufs)} buffers but {len(zs)} zcr buffers")
        c = self.config
        for buf, n, z in zip(bufs, n_frames, zs, strict=True):
            need = (n - 1) * c.hop_length + c.n_fft
            if n <= 0 or buf.shape[-1] < need:
                raise ValueError(f"need {need} samples for {n} frames, got {buf.shape[-1]}")
            if z is not None and z.shape[-1] < need:
                raise ValueError(f"need {need} zcr samples for {n} frames, got {z.shape[-1]}")
        # a buffer longer than a batch is cut into pieces of whole frames (bounded memory)
        pieces: list[tuple[int, np.ndarray, int, np.ndarray | None]] = []
        step = self.max_batch_frames
        for item, (buf, n, z) in enumerate(zip(bufs, n_frames, zs, strict=True)):
            for j in range(0, int(n), step):
                at = j * c.hop_length
                pieces.append((item, buf[at:], min(step, int(n) - j),
                               None if z is None else z[at:]))
        parts: list[list[FrameFeatures]] = [[] for _ in bufs]
        for group in self._groups([p[2] for p in pieces]):
            done = self._run_group([pieces[i][1] for i in group], [pieces[i][2] for i in group],
                                   [pieces[i][3] for i in group])
            for i, features in zip(group, done, strict=True):
                parts[pieces[i][0]].append(features)
        return [FrameFeatures.concat(p) for p in parts]

    # ------------------------------------------------------------------------------------
    def _groups(self, n_frames: Sequence[int]) -> Iterator[list[int]]:
        group: list[int] = []
        total = 0
        for i, n in enumerate(n_frames):
            if group and total + n > self.max_batch_frames:
                yield group
                group, total = [], 0
            group.append(i)
            total += n
        if group:
            yield group

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Window, bin frequencies and filter banks on the device (built on first use)."""
        if self._t is None:
            import torch

            def put(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
                return torch.as_tensor(np.ascontiguousarray(a)).to(self.device, dtype)

            self._t = {
                "window": put(self.window),
                "freqs": put(self.freqs),
                "freqs64": put(self.freqs, torch.float64),
                "mel_t": put(self.mel_basis_t),
                "chroma_t": put(self.chroma_basis_t),
                "dct_t": put(self.dct_t),
            }
        return self._t

    def _run_group(self, bufs: list[np.ndarray], counts: list[int],
                   zcr_bufs: list[np.ndarray | None]) -> list[FrameFeatures]:
        import torch

        try:
            packed = self._compute(bufs, counts, zcr_bufs)
        except torch.cuda.OutOfMemoryError:
            # the device is shared or the batch too large: this batch on the CPU instead
            torch.cuda.empty_cache()
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("feature device %s out of memory: batch computed on the CPU",
                            self.device)
            return [SpectralExtractor.frames(self, b, n, zcr_buf=z)
                    for b, n, z in zip(bufs, counts, zcr_bufs, strict=True)]
        return self._split(packed, counts)

    def _split(self, packed: np.ndarray, counts: list[int]) -> list[FrameFeatures]:
        """Per buffer, each field a fresh contiguous array (a view would keep the batch)."""
        c = self.config
        widths = [c.n_mels, c.n_mfcc, c.n_chroma, len(SCALAR_FEATURES), c.contrast_bands + 1,
                  c.contrast_bands + 1]
        edges = np.cumsum([0, *widths])
        out = []
        row = 0
        for n in counts:
            block = packed[row:row + n]
            out.append(FrameFeatures(*(block[:, a:b].copy()
                                       for a, b in itertools.pairwise(edges))))
            row += n
        return out

    @staticmethod
    def _pack(bufs: list[np.ndarray], counts: list[int], hop: int, n_fft: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Pack buffers into one array and say where each frame is.

        Each buffer starts at a multiple of ``hop``, so every frame is a row of one strided
        view of the array; returns the array and each frame's row in that view.
        """
        offsets = []
        pos = 0
        for n in counts:
            offsets.append(pos)
            need = (n - 1) * hop + n_fft
            pos += -(-need // hop) * hop
        flat = np.zeros(pos + n_fft, dtype=np.float32)  # tail: whole hops for the rms blocks
        rows = np.empty(sum(counts), dtype=np.int64)
        r = 0
        for buf, n, off in zip(bufs, counts, offsets, strict=True):
            need = (n - 1) * hop + n_fft
            flat[off:off + need] = buf[:need]
            rows[r:r + n] = off // hop + np.arange(n)
            r += n
        return flat, rows

    def _compute(self, bufs: list[np.ndarray], counts: list[int],
                 zcr_bufs: list[np.ndarray | None]) -> np.ndarray:
        """All fields of every frame of the group as one ``(T, columns)`` float32 array."""
        import torch

        c = self.config
        t = self._tensors()
        n_fft, hop, dev = c.n_fft, c.hop_length, self.device
        flat_np, rows_np = self._pack(bufs, counts, hop, n_fft)
        host = [flat_np]
        if any(z is not None for z in zcr_bufs):
            host.append(self._pack([b if z is None else z for b, z in zip(bufs, zcr_bufs,
                                                                           strict=True)],
                                   counts, hop, n_fft)[0])
        # one host-to-device copy of the samples (and their edge-padded copy), one of the rows
        samples = torch.from_numpy(np.concatenate(host)).to(dev)
        flat = samples[:flat_np.size]
        zflat = samples[flat_np.size:] if len(host) > 1 else flat
        rows = torch.from_numpy(rows_np).to(dev)

        with _full_precision_matmul():
            frames = flat.unfold(0, n_fft, hop).index_select(0, rows)
            spec = torch.fft.rfft(frames * t["window"], dim=-1)
            mag = spec.abs()
            del spec
            power = mag * mag

            logmel = 10.0 * torch.log10(torch.clamp_min(power @ t["mel_t"], c.amin))
            mfcc = logmel @ t["dct_t"]
            chroma = power @ t["chroma_t"]
            cmax = chroma.amax(dim=-1, keepdim=True)
            chroma = chroma / torch.where(cmax < _TINY32, torch.ones_like(cmax), cmax)

            # centroid, bandwidth: float64 sums, as the numpy kernel (tasks/kernels.py)
            mag64 = mag.double()
            f64 = t["freqs64"]
            s0 = mag64.sum(dim=-1)
            norm = torch.where(s0 >= _TINY32, s0, torch.ones_like(s0))
            centroid = (mag64 @ f64) / norm
            spread = (mag64 * (f64[None, :] - centroid[:, None]).square()).sum(dim=-1)
            bandwidth = torch.sqrt(spread / norm)
            # rolloff: first bin whose cumulative magnitude reaches the share of the total
            cum = torch.cumsum(mag64, dim=-1)
            del mag64
            threshold = float(np.float32(c.rolloff_percent)) * cum[:, -1:]
            hit = torch.searchsorted(cum, threshold).squeeze(-1).clamp_max(mag.shape[-1] - 1)
            del cum
            rolloff = t["freqs"][hit]

            floor = torch.clamp_min(power, 1e-10)
            flatness = torch.exp(torch.log(floor).mean(dim=-1)) / floor.mean(dim=-1)
            del floor, power

            zcr = self._zcr(zflat, rows, n_fft, hop, c.zcr_threshold)
            rms = self._rms(flat, frames, rows, n_fft, hop)
            del frames
            # in SCALAR_FEATURES order
            scalars = torch.stack([centroid.float(), bandwidth.float(), rolloff, flatness,
                                   zcr, rms], dim=1)
            peak, valley = self._contrast(mag)
            packed = torch.cat([logmel, mfcc, chroma, scalars, peak, valley], dim=1)
        return packed.cpu().numpy()  # one device-to-host copy

    @staticmethod
    def _zcr(zflat: torch.Tensor, rows: torch.Tensor, n_fft: int, hop: int,
             threshold: float) -> torch.Tensor:
        """Zero-crossing rate as librosa's: sign changes between neighbours in each frame."""
        import torch

        negative = zflat < -threshold  # |x| <= threshold counts as zero, zero as positive
        changes = (negative[1:] != negative[:-1]).to(torch.int32)
        cumulative = torch.cat([changes.new_zeros(1), torch.cumsum(changes, 0, dtype=torch.int32)])
        starts = rows * hop
        counts = cumulative[starts + n_fft - 1] - cumulative[starts]
        return (counts.double() / n_fft).float()

    @staticmethod
    def _rms(flat: torch.Tensor, frames: torch.Tensor, rows: torch.Tensor, n_fft: int,
             hop: int) -> torch.Tensor:
        """Time-domain RMS of each frame, energies summed in float64 (as the numpy path)."""
        import torch

        if n_fft % hop == 0:  # frames are whole hops: sum each hop block once
            usable = flat.shape[0] // hop * hop
            blocks = flat[:usable].double().square().view(-1, hop).sum(dim=1)
            energy = blocks.unfold(0, n_fft // hop, 1).index_select(0, rows).sum(dim=1)
        else:
            energy = frames.double().square().sum(dim=1)
        return torch.sqrt(energy / n_fft).float()

    def _contrast(self, mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per band, mean of the ``count`` smallest and largest magnitudes of each frame."""
        import torch

        peaks, valleys = [], []
        for lo, hi, count in self.bands:
            sub = mag[:, lo:hi]
            if count == 1:
                valleys.append(sub.amin(dim=-1))
                peaks.append(sub.amax(dim=-1))
            else:
                valleys.append(torch.topk(sub, count, dim=-1, largest=False).values.mean(-1))
                peaks.append(torch.topk(sub, count, dim=-1, largest=True).values.mean(-1))
        return torch.stack(peaks, dim=1), torch.stack(valleys, dim=1)


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """IEEE float32 matrix products inside (no TF32), whatever the process has set."""
    import torch

    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
