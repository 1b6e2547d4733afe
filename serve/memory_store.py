"""Memories for decoding: bank rows -> sparse memories through MemoryStore's caches (paper §3.1, §3.3).

This is the paper's loading path (Remark 8 puts most of explicit memory's decoding overhead here). It runs in two
places. The memory-store deployment scales on its own, near the bank's storage, each replica with its own LRU
cache in RAM; memories then travel to the generator through Ray. A generator replica may instead keep its own
tier (`memory.generator_tier`, on by default on GPUs): decoded memories in GPU memory over the stored bytes in
host RAM, so a hit costs a gather on the device and nothing crosses Ray. Both follow the bank the same way:
between compactions rows are never rewritten (appends add rows, deletes add tombstones), so the bank is re-opened
only when a newer version is asked for; rows numbered in another generation (before or after a compaction,
serve/bank_version.py) are matched by their reference ids, and a read that finds the files of its version removed
by a compaction re-opens the bank.
"""
from __future__ import annotations

import threading

import torch
from ray import serve
from ray.util.metrics import Counter
from torch import Tensor

from bank.checkpoints import parse_dtype
from bank.format import BankError
from bank.reader import MemoryBank
from bank.store import MemoryStore
from serve.bank_version import BankVersion


class BankMemories:
    """A MemoryStore over the bank's current version, re-opened when a request needs a newer one."""

    def __init__(self, uri: str, cache_size: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 host_cache_size: int | None = None):
        self.uri = uri
        self.options = {"cache_size": cache_size, "device": device, "dtype": dtype,
                        "host_cache_size": host_cache_size}
        self.lock = threading.Lock()
        self.fetches = Counter("memory3_serve_memory_fetches_total",
                               description="Memories (bank rows) fetched for decoding.",
                               tag_keys=("tier",)).set_default_tags({"tier": str(device)})
        self._open()

    def _open(self) -> None:
        bank = MemoryBank.open(self.uri)
        self.store = MemoryStore(bank, **self.options)
        self.version = BankVersion.of(bank.manifest)

    def _reopen(self, wanted: BankVersion | None = None, store: MemoryStore | None = None) -> MemoryStore:
        """The store to read from: re-opened at the bank's current version if this one is behind `wanted`, or
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

    def close(self) -> None:
        self.store.close()


@serve.deployment(name="MemoryStore")
class MemoryStoreDeployment:
    def __init__(self, bank: str, memory: dict):
        self.memories = BankMemories(bank, memory["cache_size"], dtype=parse_dtype(memory["dtype"]))

    def fetch(self, rows: list[int], bank_version: str | None = None,
              ids: list[str] | None = None) -> tuple[Tensor, Tensor]:
        return self.memories.fetch(rows, bank_version, ids)

    def stats(self) -> dict:
        return self.memories.stats()
