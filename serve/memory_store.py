"""The memory-store deployment: bank rows -> sparse memories, through MemoryStore's RAM cache (paper §3.1, §3.3).

This is the paper's loading path (Remark 8 puts most of explicit memory's decoding overhead here), so it scales
on its own: replicas near the bank's storage, each with its own LRU cache. Between compactions rows are never
rewritten (appends add rows, deletes add tombstones), so a replica re-opens the bank only when asked for a newer
version. Rows numbered in another generation (before or after a compaction, serve/bank_version.py) are matched by
their reference ids, and a read that finds the files of its version removed by a compaction re-opens the bank.
"""
from __future__ import annotations

import threading

from ray import serve
from ray.util.metrics import Counter
from torch import Tensor

from bank.checkpoints import parse_dtype
from bank.format import BankError
from bank.reader import MemoryBank
from bank.store import MemoryStore
from serve.bank_version import BankVersion


@serve.deployment(name="MemoryStore")
class MemoryStoreDeployment:
    def __init__(self, bank: str, memory: dict):
        self.uri = bank
        self.cache_size = memory["cache_size"]
        self.dtype = parse_dtype(memory["dtype"])
        self.lock = threading.Lock()
        self.fetches = Counter("memory3_serve_memory_fetches_total",
                               description="Memories (bank rows) fetched for decoding.")
        self._open()

    def _open(self) -> None:
        bank = MemoryBank.open(self.uri)
        self.store = MemoryStore(bank, cache_size=self.cache_size, device="cpu", dtype=self.dtype)
        self.version = BankVersion.of(bank.manifest)

    def _reopen(self, wanted: BankVersion | None = None, store: MemoryStore | None = None) -> MemoryStore:
        """The store to read from: re-opened at the bank's current version if this replica is behind `wanted`, or
        if `store` (the one a failed read used) is still the current one."""
        with self.lock:
            if self.version.is_behind(wanted) or (store is not None and self.store is store):
                old = self.store
                self._open()
                old.close()
            return self.store

    def fetch(self, rows: list[int], bank_version: str | None = None,
              ids: list[str] | None = None) -> tuple[Tensor, Tensor]:
        """memories (N, L_mem, 2, Hkv, k, D) and n_valid (N,) for bank rows numbered in `bank_version`; `ids`
        (the rows' reference ids) let rows numbered in another generation be matched."""
        wanted = BankVersion.parse(bank_version)
        store = self._reopen(wanted)
        self.fetches.inc(len(rows))
        try:
            return store.fetch(self._rows(store, rows, wanted, ids))
        except (BankError, FileNotFoundError):
            if ids is None:
                raise
            store = self._reopen(store=store)  # this version's files were removed by a compaction
            return store.fetch(self._rows(store, rows, None, ids))

    @staticmethod
    def _rows(store: MemoryStore, rows: list[int], wanted: BankVersion | None, ids: list[str] | None) -> list[int]:
        if ids is None or (wanted is not None and wanted.generation == BankVersion.of(store.bank.manifest).generation):
            return rows
        return [store.bank.row_of(i) for i in ids]

    def stats(self) -> dict:
        return {**self.store.stats(), "bank_version": str(self.version)}
