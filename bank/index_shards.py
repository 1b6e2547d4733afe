"""A retrieval index split by bank row ranges, for banks whose index does not fit one node (docs/scale.md).

Shard i holds rows [starts[i], starts[i+1]); the last shard also takes every row appended later. All shards are
copies of one trained, empty index (IVF centroids and PQ codebooks trained once on a sample of the whole bank),
so a vector gets the same inverted list and the same code in its shard as in one index over everything. With the
same nprobe every shard scans the same lists, and the best k of the union of the shards' top-k (`merge_topk`) is
the top-k of one index over all rows, ties aside: exactly for Flat, and for IVF exactly what the single IVF index
with those codebooks returns. Ray-free: `ShardSet` searches its shards one after the other in this process;
serve/shard_actors.py holds each shard in its own Ray actor and queries them in parallel. `set_search` and
`remove_ids` are the two calls on one FAISS index that whole and sharded indexes share.
"""
from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np


def set_search(index: faiss.Index, nprobe: int, refine_k_factor: int) -> None:
    """The per-query knobs the manifest stores beside an index (bank/index.py): IVF lists probed, and for a Refine
    stage (factory suffix `Refine(SQ8)`, `RFlat`, ...) how many candidates, k × refine_k_factor, it re-scores with
    its finer codes (FAISS's default, 1, re-scores only the k it returns: no gain). A ShardSet or shard actors
    (anything not a FAISS index) set it on every shard."""
    if not isinstance(index, faiss.Index):
        return index.set_search(nprobe, refine_k_factor)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)
    if (refine := refine_stage(index)) is not None:
        refine.k_factor = float(refine_k_factor)


def refine_stage(index: faiss.Index) -> faiss.IndexRefine | None:
    """The IndexRefine (factory suffix `,Refine(SQ8)`, `,RFlat`, ...) of an index or of the IDMap over it."""
    inner = faiss.downcast_index(index)
    inner = faiss.downcast_index(inner.index) if isinstance(inner, faiss.IndexIDMap) else inner
    return inner if isinstance(inner, faiss.IndexRefine) else None


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """`remove_ids` on an IDMap over a FAISS index, kept consistent for IVF: the IDMap drops the rows from its
    position -> row map, but an IVF keeps the old positions as its list ids (FAISS leaves renumbering them to the
    caller; unrenumbered, later searches return wrong rows), so they are renumbered here. RuntimeError where FAISS
    cannot remove (HNSW, Refine), before anything changed. A ShardSet removes each row from its shard."""
    ids = np.asarray(ids, dtype=np.int64)
    if isinstance(index, ShardSet):
        return index.remove_ids(ids)
    before = faiss.vector_to_array(faiss.downcast_index(index).id_map)
    removed = int(index.remove_ids(ids))
    ivf = faiss.try_extract_index_ivf(index)
    if removed and ivf is not None:
        gone = np.flatnonzero(np.isin(before, ids))
        new_position = np.arange(len(before)) - np.searchsorted(gone, np.arange(len(before)))
        for lst in range(ivf.nlist):
            if n := ivf.invlists.list_size(lst):
                list_ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n)  # a view: written in place
                list_ids[:] = new_position[list_ids]
    return removed


def shard_starts(rows: np.ndarray, n: int) -> list[int]:
    """First row of each of (at most) n shards that split the sorted `rows` into equal counts; the first is 0."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    n = max(1, min(int(n), len(rows)))
    return [0] + [int(rows[i * len(rows) // n]) for i in range(1, n)]


def shard_of(starts: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """Which shard holds each row."""
    return np.searchsorted(np.asarray(starts, dtype=np.int64), np.asarray(rows, dtype=np.int64), side="right") - 1


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard inner-product results (scores (n, k_i), ids (n, k_i)) -> the global (scores (n, k), ids (n, k)),
    best first, as `faiss.Index.search` returns them: -1 ids (a shard with fewer than k hits) fill the tail.
    Equal scores keep shard order (lower rows first)."""
    scores = np.concatenate([np.asarray(d, dtype=np.float32) for d, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    ids[np.isneginf(scores)] = -1
    if ids.shape[1] < k:  # fewer columns than k in all shards together
        pad = k - ids.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores, ids


class ShardSet:
    """Index shards in one process behind the calls `Retriever` and the edit path make on a FAISS index (ntotal,
    d, search, add_with_ids, remove_ids, set_search): a sharded bank is searched and edited like a whole one."""

    def __init__(self, shards: list[faiss.Index], starts: Sequence[int]):
        if len(shards) != len(starts) or not shards or starts[0] != 0 or list(starts) != sorted(starts):
            raise ValueError(f"{len(shards)} shards need as many ascending starts from 0, got {list(starts)}")
        self.shards, self.starts = list(shards), [int(s) for s in starts]

    @property
    def ntotal(self) -> int:
        return sum(int(s.ntotal) for s in self.shards)

    @property
    def d(self) -> int:
        return int(self.shards[0].d)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return merge_topk([s.search(x, k) for s in self.shards], k)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        where = shard_of(self.starts, ids)
        for i in np.unique(where).tolist():
            at = np.flatnonzero(where == i)
            self.shards[i].add_with_ids(np.ascontiguousarray(x[at]), ids[at])

    def remove_ids(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, dtype=np.int64)
        where = shard_of(self.starts, ids)
        return sum(remove_ids(self.shards[i], ids[where == i]) for i in np.unique(where).tolist())

    def set_search(self, nprobe: int, refine_k_factor: int) -> None:
        for shard in self.shards:
            set_search(shard, nprobe, refine_k_factor)
