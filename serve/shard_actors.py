"""A sharded retrieval index served by one Ray actor per shard, searched in parallel (docs/scale.md).

When a bank's index is split by row ranges (`memory3 index shards=N`, bank/index_shards.py), no process needs to
hold all of it: each shard lives in its own actor (spread over nodes), every query batch goes to all of them at
once, and their top-k lists are merged by score into the global top-k, the same rows one index would return.
`RemoteShards` offers the calls `Retriever` makes on an index (ntotal, d, search, set_search).
"""
from __future__ import annotations

import numpy as np
import ray

from bank.index import index_settings, read_index_file
from bank.index_shards import ShardSet, merge_topk


@ray.remote
class IndexShard:
    """One shard file of a bank's index, loaded (and sha256-checked) in this actor."""

    def __init__(self, bank_uri: str, entry: dict, nprobe: int, refine_k_factor: int):
        self.shard = ShardSet([read_index_file(bank_uri, entry)], [0])
        self.shard.set_search(nprobe, refine_k_factor)

    def ntotal(self) -> int:
        return self.shard.ntotal

    def set_search(self, nprobe: int, refine_k_factor: int) -> None:
        self.shard.set_search(nprobe, refine_k_factor)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.shard.shards[0].search(queries, k)


class RemoteShards:
    """The shards of a manifest's sharded index, one actor each; `search` fans out and merges."""

    def __init__(self, bank_uri: str, info: dict, num_cpus: float = 0.5, strategy: str = "SPREAD"):
        if not info.get("shards"):
            raise ValueError(f"the index of bank {bank_uri} is not sharded")
        self.d = int(info["dim"])
        settings = index_settings(info)
        self.actors = [IndexShard.options(num_cpus=num_cpus, scheduling_strategy=strategy).remote(
            bank_uri, entry, settings["nprobe"], settings["refine_k_factor"]) for entry in info["shards"]]
        self.ntotal = sum(ray.get([a.ntotal.remote() for a in self.actors]))  # waits until every shard is loaded

    def set_search(self, nprobe: int, refine_k_factor: int) -> None:
        ray.get([a.set_search.remote(int(nprobe), int(refine_k_factor)) for a in self.actors])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))  # one copy in the object store for all
        return merge_topk(ray.get([a.search.remote(ref, k) for a in self.actors]), k)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
