"""`mtag query` is read-only and confined to the store unless writes are allowed."""

from __future__ import annotations

import pytest
from factories import write_shard

from featurestore.query import connect, run_query
from featurestore.store import FeatureStore
from tasks.config import FeatureConfig
from tasks.errors import ParameterError


@pytest.fixture
def store(tmp_path):
    s = FeatureStore(str(tmp_path / "store"), create=True)
    s.register_feature_set(FeatureConfig())
    written, _ = write_shard(s, "s-0", [("t0", 4.0)])
    s.commit_shards([written])
    return s


@pytest.mark.parametrize(("sql", "match"), [
    ("COPY (SELECT 1) TO '{store}/x.csv'", "read-only: COPY"),
    ("CREATE TABLE t AS SELECT 1", "read-only: CREATE"),
    ("SELECT * FROM read_csv('{outside}')", "refused: Permission"),
    ("ATTACH '{outside}.db' AS x", "read-only: ATTACH"),
    ("INSTALL httpfs", "read-only"),
    ("SET enable_external_access = true", "read-only: SET"),
])
def test_writes_and_files_outside_the_store_are_refused(store, tmp_path, sql, match):
    outside = tmp_path / "secret.csv"
    outside.write_text("a\n1\n")
    con = connect(store)
    with pytest.raises(ParameterError, match=match):
        run_query(con, sql.format(store=store.root, outside=outside))
    assert not (tmp_path / "store" / "x.csv").exists()
    assert run_query(con, "SELECT count(*) AS n FROM segments").to_pylist() == [{"n": 2}]


def test_allow_writes_lifts_it(store, tmp_path):
    outside = tmp_path / "other.csv"
    outside.write_text("a\n7\n")
    con = connect(store, read_only=False)
    got = run_query(con, f"SELECT a FROM read_csv('{outside}')", allow_writes=True)
    assert got.to_pylist() == [{"a": 7}]
