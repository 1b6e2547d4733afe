"""The bank writer deployment: the admin API's single writer, and the source of the live bank version.

One replica, one lock: documents added (chunked, encoded into sparse memories, stored, indexed — `append_documents`),
references deleted, and the bank compacted (deleted rows removed from its files — `compact_bank`) one change at a
time, so concurrent admin calls never race on the manifest. Reads carry on during a compaction: the old version's
files stay until the new manifest is committed. After each change it re-reads the manifest; the ingress asks it for the current version with every
request that reads memory, and the retriever and memory-store replicas reload when they are behind
(serve/bank_version.py). The model that encodes new documents is loaded on the first write only.
"""
from __future__ import annotations

import asyncio
import time

from ray import serve

from bank.checkpoints import load_model
from bank.manifest import read_manifest
from bank.reader import MemoryBank
from serve.bank_version import BankVersion


@serve.deployment(name="BankWriter", num_replicas=1)
class BankWriter:
    def __init__(self, bank: str, checkpoint: str, writer: dict, embedder: str | None):
        self.uri, self.checkpoint = bank, checkpoint
        self.device, self.dtype = writer["device"], writer["dtype"]
        self.refresh_s = writer["refresh_s"]
        self.embedder_name = embedder
        self.lock = asyncio.Lock()
        self.model = self.tokenizer = self.embedder = None
        self._read_version()

    def _read_version(self) -> None:
        self.version = BankVersion.of(read_manifest(self.uri))
        self.read_at = time.monotonic()

    async def current_version(self) -> str:
        """The bank's state now; re-read now and then so offline edits (`memory3 bank delete`) are seen too."""
        if time.monotonic() - self.read_at > self.refresh_s and not self.lock.locked():
            await asyncio.to_thread(self._read_version)
        return str(self.version)

    def _load_encoder(self) -> None:
        from bank.embedder import Embedder

        self.model, self.tokenizer = load_model(self.checkpoint, self.device, self.dtype)
        name = self.embedder_name or read_manifest(self.uri)["embedder"]["model"]
        self.embedder = Embedder(name, device=self.device)

    async def add(self, documents: list[dict]) -> dict:
        """{"ids": new reference ids, "bank_version"} or {"error", "status"} for documents the bank refuses."""
        from bank.edits import append_documents

        async with self.lock:
            if self.model is None:
                await asyncio.to_thread(self._load_encoder)
            try:
                ids = await asyncio.to_thread(append_documents, self.uri, documents, self.model, self.tokenizer,
                                              self.embedder)
            except ValueError as e:  # invalid documents, or ids the bank already holds (BankError is a ValueError)
                return {"error": str(e), "status": 409 if "already in the bank" in str(e) else 400}
            await asyncio.to_thread(self._read_version)
            return {"ids": list(ids), "bank_version": str(self.version)}

    async def compact(self) -> dict:
        """Rewrite the shards holding deleted rows without them (bank/compact.py): the compaction's summary plus
        the new "bank_version"."""
        from bank.compact import compact_bank

        async with self.lock:
            summary = await asyncio.to_thread(compact_bank, self.uri)
            await asyncio.to_thread(self._read_version)
            return {**summary, "bank_version": str(self.version)}

    async def delete(self, ref_id: str) -> dict:
        """{"deleted": True, "bank_version"} or {"error", "status": 404} for an unknown or already deleted id."""
        from bank.edits import delete_references

        async with self.lock:
            bank = await asyncio.to_thread(MemoryBank.open, self.uri)
            try:
                row = bank.row_of(ref_id)
            except KeyError:
                return {"error": f"no memory with id {ref_id!r}", "status": 404}
            if bank.is_deleted(row):
                return {"error": f"memory {ref_id!r} is already deleted", "status": 404}
            n = await asyncio.to_thread(delete_references, self.uri, [ref_id])
            await asyncio.to_thread(self._read_version)
            return {"deleted": n > 0, "bank_version": str(self.version)}
