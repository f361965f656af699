"""Track-level splits: stratified, seeded, groups kept together, explicit splits respected.

Segments of one track never land on two sides (the notebooks' leak); with a group column
(e.g. artist) no group does either. Multi-label sets stratify on each track's rarest label.
:func:`check_split` tells a training set whose classes are too small to split, before any
model is fitted.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from tasks.errors import ParameterError

MAX_UNITS = 100_000


def side_counts(n: int, valid_size: float, test_size: float) -> tuple[int, int, int]:
    """``(train, valid, test)`` units a stratum of ``n`` units (tracks or groups) gets."""
    n_test = int(round(n * test_size)) if n >= 3 else (1 if n == 2 else 0)
    n_valid = int(round(n * valid_size)) if n >= 3 else 0
    return n - n_test - n_valid, n_valid, n_test


def min_units(valid_size: float, test_size: float) -> int:
    """Fewest units a stratum needs for one on train, on test and (if ``valid_size``) on
    valid; 0 if no stratum size up to :data:`MAX_UNITS` gets there.
    """
    for n in range(1, MAX_UNITS + 1):
        train, valid, test = side_counts(n, valid_size, test_size)
        if train >= 1 and test >= 1 and (valid >= 1 or valid_size == 0):
            return n
    return 0


def check_sizes(valid_size: float, test_size: float) -> None:
    """Raise :class:`~tasks.errors.ParameterError` for split fractions out of range."""
    if not (0 <= valid_size < 1 and 0 < test_size < 1 and valid_size + test_size < 1):
        raise ParameterError(f"--valid-size ({valid_size:g}) and --test-size ({test_size:g}) "
                             "must be fractions (valid may be 0, test may not) summing below 1")


def split_tracks(frame: pd.DataFrame, *, valid_size: float = 0.15, test_size: float = 0.15,
                 seed: int = 0) -> pd.Series:
    """Assign each track to ``train``, ``valid`` or ``test``.

    Parameters
    ----------
    frame : pd.DataFrame
        ``track_id``, ``labels`` and optional ``split`` and ``group`` columns.
    valid_size, test_size : float
        Fractions of tracks (of groups, when grouped) per class.
    seed : int

    Returns
    -------
    pd.Series
        Split name per row of ``frame`` (same index); ``attrs["explicit"]`` holds the
        positions of the rows whose split the ``split`` column gave (read by
        :func:`check_split`).
    """
    check_sizes(valid_size, test_size)
    out = pd.Series(frame.get("split", pd.Series([None] * len(frame), index=frame.index)),
                    index=frame.index, dtype=object)
    free = out.isna()
    counts = Counter(lab for labs in frame["labels"] for lab in labs)
    strat = frame["labels"].map(lambda labs: min(labs, key=lambda x: (counts[x], x)))
    groups = frame["group"] if "group" in frame.columns else frame["track_id"]
    rng = np.random.default_rng(seed)
    # unit of assignment: a group; its stratum is its most common stratum label
    members: dict[str, list[int]] = defaultdict(list)
    for i in frame.index[free]:
        members[str(groups[i])].append(i)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for g, idx in members.items():
        by_stratum[Counter(strat[i] for i in idx).most_common(1)[0][0]].append(g)
    for stratum in sorted(by_stratum):
        gs = sorted(by_stratum[stratum])
        rng.shuffle(gs)
        _, n_valid, n_test = side_counts(len(gs), valid_size, test_size)
        for k, g in enumerate(gs):
            name = "test" if k < n_test else ("valid" if k < n_test + n_valid else "train")
            for i in members[g]:
                out[i] = name
    out.attrs["explicit"] = tuple(int(i) for i in np.flatnonzero(~free.to_numpy()))
    return out


def check_split(frame: pd.DataFrame, splits: pd.Series, *, valid_size: float,
                test_size: float, group_column: str | None = None) -> None:
    """Raise :class:`~tasks.errors.ParameterError` if a class misses a side of the split.

    Every class needs a track on train and on test, and on valid when ``valid_size`` is not
    0 (unless the ``split`` column gave every track's split and named no valid track). The
    message names the classes that fall short, their tracks (or groups) and how many a
    class needs at these sizes.

    Parameters
    ----------
    frame : pd.DataFrame
        ``track_id``, ``labels`` and optional ``group`` (as given to :func:`split_tracks`).
    splits : pd.Series
        :func:`split_tracks`' result for ``frame``.
    """
    explicit = np.zeros(len(splits), bool)
    explicit[list(splits.attrs.get("explicit", ()))] = True
    side = splits.to_numpy(object)
    need_valid = valid_size > 0 and not (explicit.all() and "valid" not in set(side))
    required = ["train", *(["valid"] if need_valid else []), "test"]
    members: dict[str, list[int]] = defaultdict(list)
    for pos, labs in enumerate(frame["labels"]):
        for lab in labs:
            members[lab].append(pos)
    groups = frame["group"].to_numpy(object) if "group" in frame.columns else None
    short: list[tuple[int, str, list[str]]] = []
    for cls, rows in members.items():
        missing = [s for s in required if s not in set(side[rows])]
        if missing:
            units = len(set(groups[rows])) if groups is not None else len(rows)
            short.append((units, cls, missing))
    if not short:
        return
    short.sort()
    unit = "groups" if groups is not None else "tracks"
    of = f" (distinct --group-column {group_column!r} values)" if groups is not None and \
        group_column else ""
    sides = " and ".join([", ".join(required[:-1]), required[-1]])
    need = min_units(valid_size, test_size)
    listed = ", ".join(f"{cls!r} ({n} {unit[:-1] if n == 1 else unit})"
                       for n, cls, _ in short[:5]) + (f" and {len(short) - 5} more"
                                                      if len(short) > 5 else "")
    one = len(short) == 1
    if need and all(n < need for n, _, _ in short) and not explicit.any():
        raise ParameterError(
            f"{'class' if one else 'classes'} {listed} {'has' if one else 'have'} too few "
            f"{unit} to split into {sides}: with --valid-size {valid_size:g} and --test-size "
            f"{test_size:g} each class needs at least {need} {unit}{of}; label more tracks "
            f"of {'that class' if one else 'those classes'} or leave "
            f"{'it' if one else 'them'} out of the labels file")
    missing = sorted({s for _, _, m in short for s in m}, key=required.index)
    raise ParameterError(
        f"{'class' if one else 'classes'} {listed} {'gets' if one else 'get'} no "
        f"{' or '.join(missing)} tracks from the split column and the random split, and every "
        f"class needs {sides} tracks"
        + (f" (at least {need} {unit}{of} per class at --valid-size {valid_size:g} and "
           f"--test-size {test_size:g})" if need else "")
        + f"; label more tracks of {'that class' if one else 'those classes'}, fix the split "
        f"column, or leave {'it' if one else 'them'} out")
