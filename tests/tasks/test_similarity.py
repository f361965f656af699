"""Neighbour search: exact tiled search against brute force, ANN recall, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import ParameterError
from tasks.predictions import l2_normalize
from tasks.similarity import ANN_BACKENDS, AnnIndex, exact_search, recall_at_k


def brute(q, base, k, exclude=None):
    sims = q @ base.T
    if exclude is not None:
        sims[np.arange(len(q)), exclude] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def clustered(rng, n, d, centres=20):
    c = rng.standard_normal((centres, d))
    return l2_normalize(c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, d)))


@pytest.mark.parametrize("tile", [1 << 23, 500, 64])
def test_exact_matches_brute_force_whatever_the_tiling(rng, tile):
    base = l2_normalize(rng.standard_normal((700, 16)))
    q, own = base[:90], np.arange(90)
    want_i, want_s = brute(q, base, 7, own)
    got = exact_search(q, base, 7, exclude=own, tile_elements=tile)
    assert (got.index == want_i).all()
    np.testing.assert_allclose(got.similarity, want_s, rtol=1e-5)
    assert not (got.index == own[:, None]).any()


def test_exact_edge_cases(rng):
    base = l2_normalize(rng.standard_normal((3, 4)))
    got = exact_search(base, base, 5, exclude=[0, 1, 2])  # fewer candidates than k
    assert (got.index[:, 2:] == -1).all() and np.isneginf(got.similarity[:, 2:]).all()
    assert (got.index[:, :2] >= 0).all()
    with pytest.raises(ParameterError, match="dimension"):
        exact_search(np.zeros((1, 3), np.float32), base, 1)
    with pytest.raises(ParameterError, match="NaN"):
        exact_search(np.full((1, 4), np.nan, np.float32), base, 1)
    with pytest.raises(ParameterError, match="one entry per query"):
        exact_search(base, base, 1, exclude=[0])


def test_recall_at_k():
    exact = np.array([[1, 2, 3], [4, 5, -1]])
    assert recall_at_k(np.array([[3, 2, 9], [5, 4, 7]]), exact) == pytest.approx(4 / 5)


@pytest.mark.parametrize("backend", ANN_BACKENDS)
def test_ann_recall_exclusion_and_round_trip(rng, backend):
    base = clustered(rng, 3000, 32)
    q, own = base[:200], np.arange(200)
    exact = exact_search(q, base, 10, exclude=own)
    index = AnnIndex(32, backend=backend, threads=1)
    index.add(base[:1500])
    index.add(base[1500:])  # rows keep their positions across adds
    found = index.search(q, 10, exclude=own)
    assert recall_at_k(found.index, exact.index) >= 0.95
    assert not (found.index == own[:, None]).any()
    hit = found.index[:, 0] == exact.index[:, 0]
    np.testing.assert_allclose(found.similarity[hit, 0], exact.similarity[hit, 0], atol=1e-5)
    restored = AnnIndex.from_bytes(index.to_bytes(), 32, backend=backend, threads=1)
    assert restored.size == 3000
    assert (restored.search(q[:1], 10).index == index.search(q[:1], 10).index).all()


def test_ann_rejects_unknown_backend():
    with pytest.raises(ParameterError, match="backend"):
        AnnIndex(8, backend="annoy")
