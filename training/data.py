"""Datasets over the feature store: memory-mapped segment tensors and summary tables.

Rows are segments; labels and splits are per track. Nothing is copied into RAM beyond a batch:
:class:`SegmentDataset` reads each matrix from the memory-mapped Arrow shards on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from featurestore.reader import TensorReader
from featurestore.store import FeatureStore
from tasks.track import summary_columns
from training.labels import LabelSet


@dataclass
class SplitRows:
    """Segment rows of one split: positions in the reader, their track ids and targets."""

    rows: np.ndarray  # int64 positions in TensorReader (or in the summary table)
    track_ids: np.ndarray  # object
    targets: np.ndarray  # (n, n_classes) float32

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def split_rows(track_ids: np.ndarray, labels: LabelSet, splits: pd.Series) -> dict[str, SplitRows]:
    """Group segment rows (by their track id) into the splits of their tracks."""
    split_of = dict(zip(labels.frame["track_id"], splits, strict=True))
    names = np.array([split_of.get(t) for t in track_ids], dtype=object)
    out = {}
    for name in ("train", "valid", "test"):
        rows = np.flatnonzero(names == name)
        tids = track_ids[rows]
        out[name] = SplitRows(rows, tids, labels.targets(tids) if len(rows) else
                              np.zeros((0, len(labels.classes)), np.float32))
    return out


class SegmentDataset(Dataset):
    """``(matrix, target)`` pairs: a ``(rows, frames)`` float32 tensor and a multi-hot vector.

    Parameters
    ----------
    reader : TensorReader
    part : SplitRows
    feature : str
        ``"logmel"`` or ``"mfcc"``.
    crop_frames : int, optional
        Random crops of this many frames within each segment's valid frames (training only).
    seed : int
    """

    def __init__(self, reader: TensorReader, part: SplitRows, feature: str, *,
                 crop_frames: int | None = None, seed: int = 0) -> None:
        self.reader, self.part, self.feature = reader, part, feature
        self.crop_frames = crop_frames
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.part.rows[i])
        matrix = self.reader.matrix(self.feature, row)
        if self.crop_frames and self.crop_frames < matrix.shape[1]:
            valid = int(self.reader.index.valid_frames[row])
            span = max(0, min(valid, matrix.shape[1]) - self.crop_frames)
            rng = np.random.default_rng((self.seed, self.epoch, i))
            start = int(rng.integers(0, span + 1))
            matrix = matrix[:, start:start + self.crop_frames]
        return torch.from_numpy(np.array(matrix)), torch.from_numpy(self.part.targets[i])


def row_statistics(reader: TensorReader, part: SplitRows, feature: str, *,
                   max_rows: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and std of ``feature`` over (a sample of) the training segments."""
    rng = np.random.default_rng(seed)
    pick = part.rows if len(part) <= max_rows else rng.choice(part.rows, max_rows, replace=False)
    stack = np.stack([reader.matrix(feature, int(r)) for r in pick]).astype(np.float64)
    return (torch.tensor(stack.mean(axis=(0, 2)), dtype=torch.float32),
            torch.tensor(stack.std(axis=(0, 2)), dtype=torch.float32))


def summary_frame(store: FeatureStore, feature_set: str, *, version: int | None = None
                  ) -> tuple[pd.DataFrame, list[str]]:
    """The ``segments`` table (summary statistics, at ``version``) and its feature columns."""
    table = store.read(feature_set, "segments", version=version).to_pandas()
    columns = summary_columns(store.config(feature_set))
    return table, columns
