"""A sharded index (bank/index_shards.py) against one index over everything: real FAISS, clustered vectors."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from bank.index import filled, index_rows, load_index, renumber_rows, trained_index, write_index_file
from bank.index_shards import ShardSet, merge_topk, shard_of, shard_starts


def clustered(n: int, d: int = 32, clusters: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: what sentence embeddings of a real corpus look like to an IVF."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    x = clustered(6000)
    rows = np.arange(len(x), dtype=np.int64) * 3 + 7  # bank rows need not be dense
    return x, rows, clustered(50, seed=1)


def test_shard_starts_split_rows_into_equal_counts():
    rows = np.arange(10, 110)
    assert shard_starts(rows, 4) == [0, 35, 60, 85]
    assert shard_of([0, 35, 60, 85], np.array([0, 34, 35, 109, 10**9])).tolist() == [0, 0, 1, 3, 3]
    assert shard_starts(np.arange(3), 8) == [0, 1, 2]  # never an empty shard


def test_merge_topk_orders_by_score_and_pads():
    a = (np.array([[0.9, 0.5, 0.1]]), np.array([[10, 11, 12]]))
    b = (np.array([[0.7, 0.6, -np.inf]]), np.array([[20, 21, -1]]))
    scores, ids = merge_topk([a, b], 4)
    assert ids.tolist() == [[10, 20, 21, 11]] and np.allclose(scores, [[0.9, 0.7, 0.6, 0.5]])
    _, ids = merge_topk([(np.array([[0.3]]), np.array([[5]]))], 3)
    assert ids.tolist() == [[5, -1, -1]]


@pytest.mark.parametrize("factory,nprobe", [("Flat", 1), ("IVF64,PQ8", 4), ("IVF64,Flat", 8)])
def test_two_shards_return_what_one_index_returns(data, factory, nprobe):
    x, rows, queries = data
    template = trained_index(x, factory)
    whole, shards = filled(template, x, rows), filled(template, x, rows, shards=2)
    assert isinstance(shards, ShardSet) and [s.ntotal for s in shards.shards] == [3000, 3000]
    for index in (whole, shards.shards[0], shards.shards[1]):
        if (ivf := faiss.try_extract_index_ivf(index)) is not None:
            ivf.nprobe = nprobe
    want_d, want = whole.search(queries, 10)
    got_d, got = shards.search(queries, 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5)
    np.testing.assert_array_equal(np.sort(index_rows(shards)), rows)


def test_edits_and_renumbering_follow_row_ranges(data, tmp_path):
    x, rows, _ = data
    shards = filled(trained_index(x[:4000]), x[:4000], rows[:4000], shards=2)
    shards.add_with_ids(x[4000:], rows[4000:])  # appended rows go to the last shard
    assert [s.ntotal for s in shards.shards] == [2000, 4000]
    assert shards.remove_ids(rows[[0, 1, 5000]]) == 3
    info = write_index_file(str(tmp_path), shards, "Flat", 16)
    assert len(info["shards"]) == 2 and info["rows"] == 5997
    loaded = load_index(str(tmp_path), {"index": info})
    assert loaded.starts == shards.starts and loaded.ntotal == 5997
    kept = np.delete(rows, [0, 1, 5000])
    new_row = np.full(rows.max() + 1, -1)
    new_row[kept] = np.arange(len(kept))  # a compaction: surviving rows renumbered densely, in order
    renumbered = renumber_rows(loaded, new_row)
    assert renumbered.starts == [0, 1998]  # the rows before the second shard's first, minus two deleted ones
    np.testing.assert_array_equal(np.sort(index_rows(renumbered)), np.arange(len(kept)))
    assert shard_of(renumbered.starts, new_row[rows[2000:2001]]).tolist() == [1]
