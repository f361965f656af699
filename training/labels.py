"""Label files: read, normalise, match to ingested tracks, hash.

A labels file is CSV or Parquet with ``path,label`` (paths absolute or relative to the labels
file's folder) or ``track_id,label``. Multi-label rows hold several labels as ``a|b`` or a list
column. Optional columns: ``split`` (train/valid/test, overrides the random split) and any
group column (e.g. ``artist``) named on the command line. Paths are only *compared* with the
URIs the store has seen; nothing named in a labels file is ever opened.

Every row that does not become a track is counted by reason (:data:`DROP_REASONS`) and shown
by :meth:`LabelSet.report`; a file that cannot give a training set at all (missing, empty, not
CSV or Parquet, no label column, every label empty, nothing matching the store) raises a
:class:`~tasks.errors.ParameterError` that says what is wrong and what to do.
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
LABEL_COLUMNS = ("label", "labels", "tags", "tag")
"""Accepted names of the label column, in order of preference."""
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
HEADER_HINT = "a header row such as 'path,label' (or 'track_id,label') and one row per track"

DROP_REASONS = {
    "empty_label": "with an empty label",
    "no_key": "with an empty path/track_id",
    "unmatched": "matching no ingested track",
    "failed": "naming tracks that failed ingestion",
    "duplicate": "repeating the track of an earlier row (labels merged)",
}
"""Why a label row did not become a track of its own: key -> phrase of the report."""


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
    rows : int
        Rows of the labels file (0: not known).
    empty_label : list of str
        Rows dropped for an empty label (their path/track_id, or ``row N``).
    no_key : list of str
        Rows dropped for an empty path/track_id (``row N``, counted from 1 after the header).
    duplicate : list of str
        Rows naming a track an earlier row named; their labels were merged into that track.
    """

    frame: pd.DataFrame
    classes: list[str]
    multi_label: bool
    unmatched: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    digest: str = ""
    rows: int = 0
    empty_label: list[str] = field(default_factory=list)
    no_key: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)

    def targets(self, track_ids: np.ndarray | list[str]) -> np.ndarray:
        """Multi-hot targets ``(n, n_classes)`` float32 for ``track_ids``."""
        index = {c: i for i, c in enumerate(self.classes)}
        by_track = dict(zip(self.frame["track_id"], self.frame["labels"], strict=True))
        out = np.zeros((len(track_ids), len(self.classes)), dtype=np.float32)
        for row, tid in enumerate(track_ids):
            for label in by_track[tid]:
                out[row, index[label]] = 1.0
        return out

    def dropped(self) -> dict[str, int]:
        """Rows that did not become a track of their own, per reason of
        :data:`DROP_REASONS` (every reason, zeros included).
        """
        return {reason: len(getattr(self, reason)) for reason in DROP_REASONS}

    def counts(self) -> dict[str, int]:
        """``rows`` read, ``tracks`` kept and the rows dropped per reason."""
        return {"rows": self.rows or len(self.frame) + sum(self.dropped().values()),
                "tracks": len(self.frame), **self.dropped()}

    def report(self) -> str:
        """One paragraph on what matched and what did not."""
        rows = self.counts()["rows"]
        lines = [f"labels: {len(self.frame)} tracks, {len(self.classes)} classes"
                 f"{' (multi-label)' if self.multi_label else ''} from {rows} label rows"]
        dropped = {k: n for k, n in self.dropped().items() if n}
        if dropped:
            lines.append(f"  {sum(dropped.values())} of {rows} label rows dropped: " + ", ".join(
                f"{n} {DROP_REASONS[k]}" for k, n in dropped.items()))
        if self.empty_label:
            lines.append(f"  {len(self.empty_label)} label rows have an empty label, e.g. "
                         f"{self.empty_label[:3]}")
        if self.no_key:
            lines.append(f"  {len(self.no_key)} label rows have an empty path/track_id, e.g. "
                         f"{self.no_key[:3]}")
        if self.unmatched:
            lines.append(f"  {len(self.unmatched)} label rows match no ingested track, e.g. "
                         f"{self.unmatched[:3]}")
        if self.failed:
            lines.append(f"  {len(self.failed)} label rows name tracks that failed ingestion, "
                         f"e.g. {self.failed[:3]}")
        if self.duplicate:
            lines.append(f"  {len(self.duplicate)} label rows repeat the track of an earlier "
                         f"row (labels merged), e.g. {self.duplicate[:3]}")
        return "\n".join(lines)


def read_table(path: str) -> pd.DataFrame:
    """The rows of a labels file, CSV (all columns as text) or Parquet, checked for shape.

    Parquet is told by the suffix (``.parquet``, ``.pq``) or the file's magic bytes; ``.tsv``
    is tab-separated; anything else is read as CSV.

    Raises
    ------
    ParameterError
        If the file is missing, a folder, empty, not CSV or Parquet, or has no rows.
    """
    if not os.path.exists(path):
        raise ParameterError(f"labels file not found: {path}; --labels takes a CSV or Parquet "
                             f"file with {HEADER_HINT}")
    if os.path.isdir(path):
        raise ParameterError(f"labels file {path} is a folder; --labels takes a CSV or Parquet "
                             f"file with {HEADER_HINT}")
    if os.path.getsize(path) == 0:
        raise ParameterError(f"labels file {path} is empty (0 bytes); it needs {HEADER_HINT}")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES) or head.startswith(b"PAR1"):
        try:
            table = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several kinds for a damaged file
            raise ParameterError(f"labels file {path} is not a readable Parquet file "
                                 f"({type(exc).__name__}: {_first_line(exc)}); write it "
                                 f"again, or as CSV with {HEADER_HINT}") from exc
    else:
        if b"\x00" in head:
            raise ParameterError(f"labels file {path} is not a CSV or Parquet file (it holds "
                                 f"binary data); --labels takes a CSV or Parquet file with "
                                 f"{HEADER_HINT}")
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False,
                                sep="\t" if lower.endswith(".tsv") else ",")
        except pd.errors.EmptyDataError as exc:
            raise ParameterError(f"labels file {path} has no header row; it needs "
                                 f"{HEADER_HINT}") from exc
        except UnicodeDecodeError as exc:
            raise ParameterError(f"labels file {path} is not UTF-8 text, so not a CSV file "
                                 f"this reads; save it as UTF-8 CSV or as Parquet") from exc
        except pd.errors.ParserError as exc:
            raise ParameterError(f"labels file {path} is not valid CSV "
                                 f"({_first_line(exc)}); it needs {HEADER_HINT}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    if not lower.endswith((*PARQUET_SUFFIXES, *CSV_SUFFIXES)) and not (
            {"path", "track_id"} & set(table.columns)):
        raise ParameterError(f"labels file {path} is not a CSV or Parquet labels file: it "
                             f"needs a 'path' or 'track_id' column and a 'label' column; "
                             f"found columns {list(table.columns)}")
    if not len(table):
        raise ParameterError(f"labels file {path} has a header ({list(table.columns)}) but no "
                             "rows; add one row per labelled track")
    return table


def read_labels(path: str, *, group_column: str | None = None) -> pd.DataFrame:
    """Read a labels file into ``key``, ``key_kind``, ``labels`` (+ split, group) columns.

    Rows with an empty label or an empty path/track_id are left out; they are listed in the
    result's ``attrs["dropped"]`` (reason -> rows) beside ``attrs["rows"]`` (rows read), which
    :func:`match_labels` carries into the :class:`LabelSet`.

    Raises
    ------
    ParameterError
        If the file cannot be read (see :func:`read_table`), lacks a ``path``/``track_id`` or
        label column or the group column, has a split value other than train/valid/test, or
        every row lacks a label or a path/track_id.
    """
    table = read_table(path)
    columns = list(table.columns)
    label_col = next((c for c in LABEL_COLUMNS if c in table.columns), None)
    key_col = "track_id" if "track_id" in table.columns else (
        "path" if "path" in table.columns else None)
    if key_col is None:
        raise ParameterError(f"labels file {path} needs a 'path' or 'track_id' column (and a "
                             f"'label' column); found columns {columns}")
    if label_col is None:
        raise ParameterError(f"labels file {path} needs a label column (one of "
                             f"{', '.join(repr(c) for c in LABEL_COLUMNS)}); found columns "
                             f"{columns}")
    if group_column and group_column not in table.columns:
        raise ParameterError(f"group column {group_column!r} (--group-column) is not a column "
                             f"of labels file {path}; its columns are {columns}")
    base = os.path.dirname(os.path.abspath(path))
    raw = table[key_col]
    no_key = (raw.isna() | (raw.astype(str).str.strip() == "")).to_numpy()
    out = pd.DataFrame({"key_kind": [key_col] * len(table)})
    keys = raw.astype(str).str.strip()
    if key_col == "path":
        keys = keys.map(lambda p: p if "://" in p or os.path.isabs(p) or not p
                        else os.path.normpath(os.path.join(base, p)))
    out["key"] = keys.to_numpy()
    out["labels"] = table[label_col].map(_split_labels).to_numpy()
    if "split" in table.columns:
        split = table["split"].astype(str).str.strip().str.lower()
        bad = sorted(set(split) - set(SPLITS) - {""})
        if bad:
            raise ParameterError(f"split values must be train/valid/test; found {bad}")
        out["split"] = split.replace("", None).to_numpy()
    if group_column:
        out["group"] = table[group_column].astype(str).to_numpy()
    empty = (out["labels"].map(len) == 0).to_numpy()
    where = [f"row {i + 1}" for i in range(len(out))]
    dropped = {"empty_label": [k if not nk else w for k, nk, w, e in
                               zip(out["key"], no_key, where, empty, strict=True) if e],
               "no_key": [w for w, nk, e in zip(where, no_key, empty, strict=True)
                          if nk and not e]}
    if empty.all():
        raise ParameterError(f"every label in labels file {path} is empty ({len(out)} rows, "
                             f"column {label_col!r}): fill in a label for each track")
    if (empty | no_key).all():
        raise ParameterError(f"no row of labels file {path} has both a {key_col} and a label "
                             f"({int(empty.sum())} empty labels, "
                             f"{int((no_key & ~empty).sum())} empty {key_col}s)")
    kept = out[~(empty | no_key)].reset_index(drop=True)
    kept.attrs = {"rows": len(out), "dropped": dropped, "source": path}
    return kept


TAG_SOURCE = "tag:"
"""A labels source ``tag:<column>`` takes the labels from the files' own tags (``tracks``
columns such as ``genre``) instead of a labels file (``mtag train --labels-from-tag``)."""


def tag_source(labels: str) -> str | None:
    """The tag column a ``tag:<column>`` labels source names, else None.

    Raises
    ------
    ParameterError
        If the column is not one of the tag columns.
    """
    if not labels.startswith(TAG_SOURCE):
        return None
    from tasks.columns import TAG_COLUMNS

    column = labels[len(TAG_SOURCE):]
    names = [c for c, _ in TAG_COLUMNS if c != "tags_error"]
    if column not in names:
        raise ParameterError(f"--labels-from-tag {column!r} is not a tag column; choose from "
                             f"{', '.join(names)}")
    return column


def labels_from_tags(tracks: pd.DataFrame, column: str, *, group_column: str | None = None
                     ) -> pd.DataFrame:
    """Labels from a tag column of ``tracks`` (one row per track), as :func:`read_labels`
    returns them from a file: values normalised (:func:`tasks.tags.normalise_tag_values`:
    case, spacing, multi-valued tags split), tracks without a value dropped and counted.

    ``group_column`` names a tag column too (``artist``): normalised the same way, so one
    artist never sits on both sides of a split however its name is spelt; a track without
    one is a group of its own.

    Raises
    ------
    ParameterError
        If no ok track has a value in ``column`` (or ``group_column`` is not a tag column).
    """
    from tasks.tags import normalise_tag_values

    if group_column:
        tag_source(TAG_SOURCE + group_column)
    ok = tracks[tracks["status"] == "ok"].reset_index(drop=True)
    out = pd.DataFrame({"key_kind": "track_id", "key": ok["track_id"].to_numpy()})
    out["labels"] = [normalise_tag_values(v) for v in ok[column]]
    if group_column:
        out["group"] = [(" ".join(normalise_tag_values(g, "\x00;")) or f"track:{t}")
                        for g, t in zip(ok[group_column], ok["track_id"], strict=True)]
    empty = (out["labels"].map(len) == 0).to_numpy()
    if empty.all():
        raise ParameterError(f"no ingested ok track has a {column!r} tag ({len(ok)} tracks): "
                             f"check `mtag query \"SELECT {column}, count(*) FROM track_tags "
                             "GROUP BY 1\"`, or give a labels file (--labels)")
    kept = out[~empty].reset_index(drop=True)
    kept.attrs = {"rows": len(out), "source": TAG_SOURCE + column, "dropped": {
        "empty_label": [p for p, e in zip(ok["path"], empty, strict=True) if e],
        "no_key": []}}
    return kept


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

    Raises
    ------
    ParameterError
        If no label row names an ingested track that is ok.
    """
    uri_to_track = dict(zip(sources["uri"], sources["track_id"], strict=True))
    uri_to_track.update(zip(tracks["path"], tracks["track_id"], strict=True))
    status = dict(zip(tracks["track_id"], tracks["status"], strict=True))
    rows, unmatched, failed, duplicate = [], [], [], []
    seen: set[str] = set()
    for rec in labels.to_dict("records"):
        tid = rec["key"] if rec["key_kind"] == "track_id" else uri_to_track.get(rec["key"])
        if tid is None or tid not in status:
            unmatched.append(rec["key"])
        elif status[tid] != "ok":
            failed.append(rec["key"])
        else:
            if tid in seen:
                duplicate.append(rec["key"])
            seen.add(tid)
            rows.append({**rec, "track_id": tid})
    if not rows:
        raise ParameterError(_no_match_message(labels, tracks, unmatched, failed))
    frame = pd.DataFrame(rows).drop(columns=["key", "key_kind"])
    # one row per track: labels merged, first split/group kept
    agg: dict[str, Any] = {"labels": lambda s: sorted({lab for labs in s for lab in labs})}
    agg |= {c: "first" for c in ("split", "group") if c in frame.columns}
    frame = frame.groupby("track_id", sort=True).agg(agg).reset_index()
    classes = sorted({lab for labs in frame["labels"] for lab in labs})
    multi = bool((frame["labels"].map(len) > 1).any())
    digest = hashlib.blake2b(frame.to_json(orient="records").encode(), digest_size=6).hexdigest()
    dropped = labels.attrs.get("dropped", {})
    return LabelSet(frame, classes, multi, unmatched, failed, "ls-" + digest,
                    rows=int(labels.attrs.get("rows", len(labels))),
                    empty_label=list(dropped.get("empty_label", [])),
                    no_key=list(dropped.get("no_key", [])), duplicate=duplicate)


def require_classes(labels: LabelSet, source: str, minimum: int = 2) -> None:
    """Raise :class:`~tasks.errors.ParameterError` unless ``labels`` has ``minimum`` classes
    (a classifier of one class learns nothing).
    """
    if len(labels.classes) >= minimum:
        return
    named = ", ".join(repr(c) for c in labels.classes)
    raise ParameterError(f"labels file {source} names only {len(labels.classes)} class "
                         f"({named}, on {len(labels.frame)} matched tracks); a tagger needs at "
                         f"least {minimum} classes: label tracks of other classes too")


def _no_match_message(labels: pd.DataFrame, tracks: pd.DataFrame, unmatched: list[str],
                      failed: list[str]) -> str:
    """Why no label row became a track, and what to do."""
    n = len(labels)
    if not (tracks["status"] == "ok").any():
        return ("the store has no successfully ingested tracks; run `mtag ingest` on the "
                "catalogue first")
    if failed and not unmatched:
        return (f"all {n} label rows name tracks that failed ingestion or are unsupported, "
                f"e.g. {failed[:3]}; fix or replace those files and ingest again")
    kind = labels["key_kind"].iloc[0] if n else "path"
    also = f" ({len(failed)} more name tracks that failed ingestion)" if failed else ""
    if kind == "track_id":
        return (f"none of the {n} label rows names a track id of the store, e.g. "
                f"{unmatched[:3]}{also}; check the track_id column against `mtag query "
                f"\"SELECT track_id, path FROM tracks\"`")
    source = labels.attrs.get("source")
    folder = f" ({os.path.dirname(os.path.abspath(source))})" if source else ""
    return (f"none of the {n} label rows matches an ingested track, e.g. {unmatched[:3]}"
            f"{also}; check the paths: relative ones are taken from the labels file's "
            f"folder{folder} and must equal the ingested paths (`mtag query \"SELECT path "
            f"FROM tracks\"`)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _split_labels(value: object) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return sorted({str(v).strip() for v in value if not _missing(v) and str(v).strip()})
    text = "" if _missing(value) else str(value)
    return sorted({part.strip() for part in text.split("|") if part.strip()})


def _missing(value: object) -> bool:
    """None, NaN or pd.NA (Parquet nulls)."""
    try:
        return value is None or bool(pd.isna(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
