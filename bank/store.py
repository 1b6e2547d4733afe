"""`MemoryStore`: memories by bank row through a RAM cache, the paper's loading path (§3.1, §3.3).

The paper puts the inference overhead of explicit memory in loading it (Remark 8: 35% slower decoding, although
reading memories is 0.23% of the compute). This is that path: a RAM cache of recently used memories (§3.1; LRU
here), vectorised reads per shard, one call to dequantize a batch, and a background prefetch thread. On a GPU the
host tier keeps records as stored (VQ codes: 14 B per vector for the paper's codec, 23x less than float32) and
the GPU dequantizes them with torch; on the CPU FAISS dequantizes into the cache.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from bank.reader import MemoryBank


SMALL_DECODE_VECTORS = 32768  # below this, one thread dequantizes faster than waking an OpenMP team


@contextlib.contextmanager
def faiss_threads(n: int | None):
    """OpenMP threads for FAISS calls made by this thread only (OpenMP's setting is per calling thread)."""
    if n is None:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class _LRU:
    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self.items: OrderedDict[int, tuple[Tensor, int]] = OrderedDict()
        self.evictions = 0

    def get(self, key: int):
        item = self.items.get(key)
        if item is not None:
            self.items.move_to_end(key)
        return item

    def put(self, key: int, value) -> None:
        if self.capacity == 0:
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
            self.evictions += 1


class MemoryStore:
    """Memories by bank row, through an LRU cache (paper §3.1: "a fixed-size cache in RAM to store the most
    recently used explicit memories"). With device='cuda' the cache holds decoded GPU tensors and a second LRU in
    host RAM (`host_cache_size`) catches what the GPU cache evicts as the stored bytes (bf16 or VQ codes), so a
    miss there costs a copy of compact bytes and a dequantization on the GPU, not a disk read. Misses are read per
    shard in one vectorised read and dequantized in one batched call (App. B)."""

    def __init__(self, bank: MemoryBank, cache_size: int = 4096, device="cpu", dtype=torch.float32, *,
                 host_cache_size: int | None = None, check_records: bool = True):
        self.bank = bank
        self.device = torch.device(device)
        self.dtype = dtype
        self.check_records = check_records
        self._cache = _LRU(cache_size)
        self._host = _LRU(cache_size if host_cache_size is None else host_cache_size) \
            if self.device.type == "cuda" else None
        self._lock = threading.RLock()
        self._pending: dict[int, Future] = {}
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="memory-prefetch")
        self._counts = {"fetch_calls": 0, "rows_requested": 0, "hits": 0, "host_hits": 0, "misses": 0,
                        "prefetched": 0, "prefetch_waits": 0, "bytes_read": 0}
        self._seconds = {"fetch": 0.0, "read": 0.0, "decode": 0.0}

    def fetch(self, rows: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(N, L_mem, 2, Hkv, k, D) memories on `device` in `dtype`, and n_valid (N,) int64 on `device`."""
        t0 = time.perf_counter()
        rows = [int(r) for r in rows]
        self.bank.locate(np.asarray(rows))  # range check before any work
        found: dict[int, tuple[Tensor, int]] = {}
        waits: list[Future] = []
        with self._lock:
            self._counts["fetch_calls"] += 1
            self._counts["rows_requested"] += len(rows)
            for r in dict.fromkeys(rows):
                item = self._cache.get(r)
                if item is not None:
                    found[r] = item
                    self._counts["hits"] += 1
                elif r in self._pending:
                    waits.append(self._pending[r])
        for fut in dict.fromkeys(waits):
            found.update(fut.result())
            with self._lock:
                self._counts["prefetch_waits"] += 1
        missing = [r for r in dict.fromkeys(rows) if r not in found]
        if missing:
            found.update(self._load(missing))
        memories = torch.stack([found[r][0] for r in rows]) if rows else \
            torch.zeros((0, *self.bank.layout.memory_shape), dtype=self.dtype, device=self.device)
        n_valid = torch.tensor([found[r][1] for r in rows], dtype=torch.int64, device=self.device)
        with self._lock:
            self._seconds["fetch"] += time.perf_counter() - t0
        return memories, n_valid

    def prefetch(self, rows: Sequence[int]) -> None:
        """Start loading rows in a background thread; a later fetch of them waits for it instead of re-reading."""
        with self._lock:
            todo = [int(r) for r in dict.fromkeys(rows)
                    if int(r) not in self._pending and self._cache.get(int(r)) is None]
            if not todo:
                return
            self.bank.locate(np.asarray(todo))
            fut = self._prefetcher.submit(self._load, todo, True)
            for r in todo:
                self._pending[r] = fut

    def _stored(self, rows: list[int], prefetch: bool) -> tuple[Tensor, Tensor]:
        """Stored payloads (N, payload_bytes) uint8 and n_valid (N,) of rows: from the host tier, else one read."""
        stored: dict[int, tuple[Tensor, int]] = {}
        with self._lock:
            for r in rows:
                item = self._host.get(r) if self._host is not None else None
                if item is not None:
                    stored[r] = item
                    self._counts["host_hits"] += 1
        cold = [r for r in rows if r not in stored]
        if cold:
            t0 = time.perf_counter()
            records = self.bank.read_records(cold, check=self.check_records)
            payload, n_valid = self.bank.layout.split(records)
            if self._host is not None and torch.cuda.is_available():
                payload = payload.pin_memory()
            with self._lock:
                self._seconds["read"] += time.perf_counter() - t0
                self._counts["misses" if not prefetch else "prefetched"] += len(cold)
                self._counts["bytes_read"] += records.nbytes
                for i, r in enumerate(cold):
                    stored[r] = (payload[i], int(n_valid[i]))
                    if self._host is not None:
                        self._host.put(r, stored[r])
        if len(cold) == len(rows):
            return payload, n_valid
        return torch.stack([stored[r][0] for r in rows]), torch.tensor([stored[r][1] for r in rows])

    def _load(self, rows: list[int], prefetch: bool = False) -> dict[int, tuple[Tensor, int]]:
        try:
            payload, n_valid = self._stored(rows, prefetch)
            t0 = time.perf_counter()
            with faiss_threads(1 if len(rows) * self.bank.layout.vectors <= SMALL_DECODE_VECTORS else None):
                memories = self.bank.layout.decode_payload(payload, n_valid, self.bank.quantizer, self.device)
            memories = memories.to(self.dtype)
            out = {r: (memories[i], int(n_valid[i])) for i, r in enumerate(rows)}
            with self._lock:
                self._seconds["decode"] += time.perf_counter() - t0
                for r, item in out.items():
                    self._cache.put(r, item)
            return out
        finally:
            if prefetch:
                with self._lock:
                    for r in rows:
                        self._pending.pop(r, None)

    def host_bytes(self) -> int:
        """Bytes the host tier holds (stored payloads: VQ codes or bf16, as on disk)."""
        with self._lock:
            return sum(p.nbytes for p, _ in self._host.items.values()) if self._host is not None else 0

    def stats(self) -> dict:
        with self._lock:
            requested = max(self._counts["rows_requested"], 1)
            return {**self._counts, "hit_rate": self._counts["hits"] / requested,
                    "cached": len(self._cache.items), "capacity": self._cache.capacity,
                    "evictions": self._cache.evictions,
                    "host_cached": len(self._host.items) if self._host is not None else 0,
                    "host_bytes": self.host_bytes(),
                    "fetch_seconds": self._seconds["fetch"], "read_seconds": self._seconds["read"],
                    "decode_seconds": self._seconds["decode"], "device": str(self.device),
                    "dtype": str(self.dtype).removeprefix("torch.")}

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True)
