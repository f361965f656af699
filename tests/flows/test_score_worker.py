"""The scoring worker's own row handling (flows.score_worker)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from flows.score_worker import _by_shard, _columns_matrix


def test_rows_split_by_shard_keep_their_order_and_drop_the_column():
    rows = pa.table({"shard": ["b", "a", "b", "c", "a", "b"], "track_id": list("uvwxyz"),
                     "x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    got = _by_shard(rows, ["a", "b", "c"])
    assert sorted(got) == ["a", "b", "c"]
    assert got["b"].column_names == ["track_id", "x"]
    assert got["b"]["track_id"].to_pylist() == ["u", "w", "z"]
    assert got["a"]["x"].to_pylist() == [2.0, 5.0]
    assert got["c"].num_rows == 1
    # chunked input, as a read of several files gives
    chunked = pa.concat_tables([rows.slice(0, 2), rows.slice(2)])
    assert {k: v.to_pydict() for k, v in _by_shard(chunked, ["a", "b", "c"]).items()} == \
        {k: v.to_pydict() for k, v in got.items()}
    assert _by_shard(rows.slice(0, 0), []) == {}
    # a shard of the plan without rows gets none
    assert _by_shard(rows, ["a", "d"])["d"].num_rows == 0


def test_summary_columns_become_one_float_matrix_with_nulls_as_nan():
    rows = pa.table({"a": pa.array([1.0, None, 3.0]), "b": pa.array([1, 2, 3], pa.int32())})
    m = _columns_matrix(rows, ["b", "a"])
    assert m.dtype == np.float64 and m.shape == (3, 2)
    np.testing.assert_array_equal(m[:, 0], [1.0, 2.0, 3.0])
    assert np.isnan(m[1, 1]) and m[2, 1] == 3.0
    assert _columns_matrix(rows, []).shape == (3, 0)
