"""Track-level splits: stratified, seeded, groups kept together, explicit splits respected.

Segments of one track never land on two sides (the notebooks' leak); with a group column
(e.g. artist) no group does either. Multi-label sets stratify on each track's rarest label.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from tasks.errors import ParameterError


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
        Split name per row of ``frame`` (same index).
    """
    if not (0 <= valid_size < 1 and 0 < test_size < 1 and valid_size + test_size < 1):
        raise ParameterError("valid_size and test_size must be fractions summing below 1")
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
        n = len(gs)
        n_test = int(round(n * test_size)) if n >= 3 else (1 if n == 2 else 0)
        n_valid = int(round(n * valid_size)) if n >= 3 else 0
        for k, g in enumerate(gs):
            name = "test" if k < n_test else ("valid" if k < n_test + n_valid else "train")
            for i in members[g]:
                out[i] = name
    return out
