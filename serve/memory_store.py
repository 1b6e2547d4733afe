"""The memory-store deployment: bank rows -> sparse memories, through MemoryStore's RAM cache (paper §3.1, §3.3).

This is the paper's loading path (Remark 8 puts most of explicit memory's decoding overhead here), so it scales
on its own: replicas near the bank's storage, each with its own LRU cache. Rows are never rewritten (appends add
rows, deletes add tombstones), so a replica re-opens the bank only when asked for a newer version.
"""
from __future__ import annotations

import threading

from ray import serve
from ray.util.metrics import Counter
from torch import Tensor

from bank.checkpoints import parse_dtype
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

    def fetch(self, rows: list[int], bank_version: str | None = None) -> tuple[Tensor, Tensor]:
        """memories (N, L_mem, 2, Hkv, k, D) and n_valid (N,) for bank rows."""
        with self.lock:
            if self.version.is_behind(BankVersion.parse(bank_version)):
                old = self.store
                self._open()
                old.close()
            store = self.store
        self.fetches.inc(len(rows))
        return store.fetch(rows)

    def stats(self) -> dict:
        return {**self.store.stats(), "bank_version": str(self.version)}
