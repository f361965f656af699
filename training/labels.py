"""Label files: read, normalise, match to ingested tracks, hash.

A labels file is CSV or Parquet with ``path,label`` (paths absolute or relative to the labels
file's folder) or ``track_id,label``. Multi-label rows hold several labels as ``a|b`` or a list
column. Optional columns: ``split`` (train/valid/test, overrides the random split) and any
group column (e.g. ``artist``) named on the command line. Paths are only *compared* with the
URIs the store has seen; nothing named in a labels file is ever opened.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tasks.errors import ParameterError

SPLITS = ("train", "valid", "test")


@dataclass
class LabelSet:
    """Labels matched to tracks.

    Attributes
    ----------
    frame : pd.DataFrame
        One row per matched ok track: ``track_id``, ``labels`` (list of str), and ``split``
        / group columns when present.
    classes : list of str
        Sorted class names; the model's output order.
    multi_label : bool
        True if any track has more than one label.
    unmatched : list of str
        Label rows that name no ingested track.
    failed : list of str
        Label rows whose track failed ingestion (or is unsupported).
    digest : str
        Hash of the matched (track_id, labels, split, group) content.
    """

    frame: pd.DataFrame
    classes: list[str]
    multi_label: bool
    unmatched: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    digest: str = ""

    def targets(self, track_ids: np.ndarray | list[str]) -> np.ndarray:
        """Multi-hot targets ``(n, n_classes)`` float32 for ``track_ids``."""
        index = {c: i for i, c in enumerate(self.classes)}
        by_track = dict(zip(self.frame["track_id"], self.frame["labels"], strict=True))
        out = np.zeros((len(track_ids), len(self.classes)), dtype=np.float32)
        for row, tid in enumerate(track_ids):
            for label in by_track[tid]:
                out[row, index[label]] = 1.0
        return out

    def report(self) -> str:
        """One paragraph on what matched and what did not."""
        lines = [f"labels: {len(self.frame)} tracks, {len(self.classes)} classes"
                 f"{' (multi-label)' if self.multi_label else ''}"]
        if self.unmatched:
            lines.append(f"  {len(self.unmatched)} label rows match no ingested track, e.g. "
                         f"{self.unmatched[:3]}")
        if self.failed:
            lines.append(f"  {len(self.failed)} label rows name tracks that failed ingestion, "
                         f"e.g. {self.failed[:3]}")
        return "\n".join(lines)


def read_labels(path: str, *, group_column: str | None = None) -> pd.DataFrame:
    """Read a labels file into ``key``, ``key_kind``, ``labels`` (+ split, group) columns.

    Raises
    ------
    ParameterError
        If the file lacks a ``path``/``track_id`` or ``label`` column, or a split value is
        not one of train/valid/test.
    """
    if not os.path.exists(path):
        raise ParameterError(f"labels file not found: {path}")
    table = pd.read_parquet(path) if path.lower().endswith((".parquet", ".pq")) else \
        pd.read_csv(path, dtype=str, keep_default_na=False)
    label_col = next((c for c in ("label", "labels", "tags", "tag") if c in table.columns), None)
    key_col = "track_id" if "track_id" in table.columns else (
        "path" if "path" in table.columns else None)
    if label_col is None or key_col is None:
        raise ParameterError(f"labels file {path} needs a 'path' or 'track_id' column and a "
                             f"'label' column; found {list(table.columns)}")
    base = os.path.dirname(os.path.abspath(path))
    out = pd.DataFrame({"key_kind": [key_col] * len(table)})
    keys = table[key_col].astype(str).str.strip()
    if key_col == "path":
        keys = keys.map(lambda p: p if "://" in p or os.path.isabs(p)
                        else os.path.normpath(os.path.join(base, p)))
    out["key"] = keys
    out["labels"] = table[label_col].map(_split_labels)
    if "split" in table.columns:
        split = table["split"].astype(str).str.strip().str.lower()
        bad = sorted(set(split) - set(SPLITS) - {""})
        if bad:
            raise ParameterError(f"split values must be train/valid/test; found {bad}")
        out["split"] = split.replace("", None)
    if group_column:
        if group_column not in table.columns:
            raise ParameterError(f"group column {group_column!r} is not in {path}")
        out["group"] = table[group_column].astype(str)
    empty = out["labels"].map(len) == 0
    return out[~empty].reset_index(drop=True)


def match_labels(labels: pd.DataFrame, tracks: pd.DataFrame, sources: pd.DataFrame) -> LabelSet:
    """Match label rows to tracks by track id or source URI.

    Parameters
    ----------
    labels : pd.DataFrame
        From :func:`read_labels`.
    tracks : pd.DataFrame
        The store's ``tracks`` view (``track_id``, ``path``, ``status``).
    sources : pd.DataFrame
        The store's ``sources`` view (``uri``, ``track_id``): every URI seen, so renamed and
        duplicate files match too.
    """
    uri_to_track = dict(zip(sources["uri"], sources["track_id"], strict=True))
    uri_to_track.update(zip(tracks["path"], tracks["track_id"], strict=True))
    status = dict(zip(tracks["track_id"], tracks["status"], strict=True))
    rows, unmatched, failed = [], [], []
    for rec in labels.to_dict("records"):
        tid = rec["key"] if rec["key_kind"] == "track_id" else uri_to_track.get(rec["key"])
        if tid is None or tid not in status:
            unmatched.append(rec["key"])
        elif status[tid] != "ok":
            failed.append(rec["key"])
        else:
            rows.append({**rec, "track_id": tid})
    if not rows:
        raise ParameterError("no label row matches an ingested track: check the paths (they "
                             "are taken relative to the labels file's folder)")
    frame = pd.DataFrame(rows).drop(columns=["key", "key_kind"])
    # one row per track: labels merged, first split/group kept
    agg: dict[str, Any] = {"labels": lambda s: sorted({lab for labs in s for lab in labs})}
    agg |= {c: "first" for c in ("split", "group") if c in frame.columns}
    frame = frame.groupby("track_id", sort=True).agg(agg).reset_index()
    classes = sorted({lab for labs in frame["labels"] for lab in labs})
    multi = bool((frame["labels"].map(len) > 1).any())
    digest = hashlib.blake2b(frame.to_json(orient="records").encode(), digest_size=6).hexdigest()
    return LabelSet(frame, classes, multi, unmatched, failed, "ls-" + digest)


def _split_labels(value: object) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return sorted({str(v).strip() for v in value if str(v).strip()})
    text = "" if value is None else str(value)
    return sorted({part.strip() for part in text.split("|") if part.strip()})
