"""The retriever deployment: query text -> the bank's best references (paper §3.1: cosine similarity, FAISS).

Concurrent queries (the windows of every request in flight) are embedded and searched together with
`@serve.batch`; a caller that holds many queries at once (a generator's windows due together) sends them in one
`search_batch` call. The replica reloads the bank and its index when a request carries a newer bank version, so a
reference added through the admin API is retrievable by the next request and a deleted one never again. Each hit
carries the bank version it was found in (its row is numbered in that version). A compaction removes the files of
the version a replica has open: a read that finds them gone re-opens the bank and searches again. A sharded index
(`memory3 index shards=N`) is searched through one Ray actor per shard (serve/shard_actors.py) unless
`retrieval.shard_actors` is false.
"""
from __future__ import annotations

import asyncio
import threading

from ray import serve

from bank.embedder import Embedder
from bank.format import BankError
from bank.index import Retriever
from bank.reader import MemoryBank
from serve.bank_version import BankVersion
from serve.shard_actors import RemoteShards


@serve.deployment(name="Retriever")
class RetrieverDeployment:
    def __init__(self, bank: str, retrieval: dict):
        self.uri = bank
        self.settings = retrieval
        self.shards: RemoteShards | None = None
        self.lock = threading.Lock()
        self.searches = self.queries = 0  # how well queries batch: queries per search
        self.embedder = Embedder(retrieval.get("embedder"), device=retrieval.get("device", "cpu"))
        self._open()
        self._search_batch.set_max_batch_size(retrieval["max_batch_size"])
        self._search_batch.set_batch_wait_timeout_s(retrieval["batch_wait_s"])

    def _open(self) -> None:
        bank = MemoryBank.open(self.uri)
        info, old = bank.manifest.get("index") or {}, self.shards
        self.shards = RemoteShards(self.uri, info, self.settings.get("shard_num_cpus", 0.5),
                                   self.settings.get("shard_strategy", "SPREAD")) \
            if info.get("shards") and self.settings.get("shard_actors", True) else None
        self.retriever = Retriever.open(self.uri, self.embedder, bank=bank, index=self.shards)
        self.version = BankVersion.of(bank.manifest)
        if old is not None:  # the new version's shards answer from here on
            old.close()

    async def search(self, query: str, k: int, bank_version: str | None = None) -> list[dict]:
        """[{"row", "id", "text", "bank_version"}] best first, at most k."""
        return await self._search_batch((query, int(k), BankVersion.parse(bank_version)))

    async def search_batch(self, queries: list[str], k: int, bank_versions: list[str | None]) -> list[list[dict]]:
        """`search` for many queries that a caller already holds together (a generator's windows that fall due at
        once), in one call. They join the same batches as single queries: calls that arrive while a search runs
        (the groups of requests that reached a generator apart, other generators' windows) are searched together
        next, instead of queueing one search each behind the replica's lock."""
        versions = [BankVersion.parse(v) for v in bank_versions]
        return list(await asyncio.gather(*(self._search_batch((query, int(k), version))
                                           for query, version in zip(queries, versions))))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _search_batch(self, items: list[tuple[str, int, BankVersion | None]]) -> list[list[dict]]:
        hits = await asyncio.to_thread(self.search_many, [q for q, _, _ in items], max(k for _, k, _ in items),
                                       [wanted for _, _, wanted in items])
        return [found[:k] for found, (_, k, _) in zip(hits, items)]

    def search_many(self, queries: list[str], k: int, wanted: list[BankVersion | None]) -> list[list[dict]]:
        """Hits per query in a bank version no older than any of `wanted`. One at a time (`search` and
        `search_batch` run it on threads): a re-open must not race a search."""
        with self.lock:
            self.searches, self.queries = self.searches + 1, self.queries + len(queries)
            if any(self.version.is_behind(w) for w in wanted):
                self._open()
            try:
                return self._search(queries, k)
            except (BankError, FileNotFoundError):  # shard files replaced by a compaction since this replica opened
                self._open()
                return self._search(queries, k)

    def _search(self, queries: list[str], k: int) -> list[list[dict]]:
        retriever, version = self.retriever, str(self.version)
        rows = retriever.search(queries, k)
        unique = sorted({r for hits in rows for r in hits})
        records = dict(zip(unique, retriever.bank.records(unique))) if unique else {}
        return [[{"row": r, "id": records[r]["id"], "text": records[r]["text"], "bank_version": version}
                 for r in hits] for hits in rows]

    def info(self) -> dict:
        return {"bank_version": str(self.version), "references": len(self.retriever.bank),
                "indexed": int(self.retriever.index.ntotal),
                "index_shard_actors": len(self.shards.actors) if self.shards is not None else 0,
                "searches": self.searches, "queries": self.queries}
