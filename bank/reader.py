"""The read side of a bank: rows by number, their records, texts and embeddings, and `verify`."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from torch import Tensor

from bank import storage
from bank.format import BankError, RecordLayout, bytes_sha256, check_records, file_sha256
from bank.manifest import index_files, read_manifest, read_shard_table, shard_uri
from model.config import ModelConfig
from model.quantizer import MemoryQuantizer


class MemoryBank:
    """Read side of a bank. Rows are global: shard i holds rows [row_offset_i, row_offset_i + rows_i)."""

    def __init__(self, uri: str, manifest: dict):
        self.uri = str(uri)
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest["model"])
        self.layout = RecordLayout.from_dict(manifest["record"])
        self.shards = manifest["shards"]
        self._offsets = np.array([0] + [s["rows"] for s in self.shards], dtype=np.int64).cumsum()
        self._deleted = set(manifest["tombstones"])
        self._quantizer: MemoryQuantizer | None = None
        self._maps: dict[int, np.memmap] = {}
        self._tables: OrderedDict[int, object] = OrderedDict()
        self._ids: list[str] | None = None
        self._doc_ids: list[str] | None = None
        self._row_of: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(16, thread_name_prefix="bank-read") if storage.is_remote(self.uri) else None

    @classmethod
    def open(cls, uri: str, *, expect_model_sha: str | None = None, expect_tokenizer_sha: str | None = None,
             verify: bool = False) -> "MemoryBank":
        manifest = read_manifest(uri)
        if expect_model_sha is not None and manifest["model_sha256"] != expect_model_sha:
            raise BankError(f"bank {uri} was written by model weights sha256 {manifest['model_sha256'][:16]}..., "
                            f"not by these weights ({expect_model_sha[:16]}...): memories are only readable by the "
                            f"model that wrote them (paper App. A, Remark 9); re-encode the bank")
        if expect_tokenizer_sha is not None and manifest["tokenizer_sha256"] != expect_tokenizer_sha:
            raise BankError(f"bank {uri} was written with tokenizer sha256 {manifest['tokenizer_sha256'][:16]}..., "
                            f"not {expect_tokenizer_sha[:16]}...; re-encode the bank with this checkpoint")
        bank = cls(uri, manifest)
        if verify:
            bank.verify()
        return bank

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def quantizer(self) -> MemoryQuantizer | None:
        q = self.manifest.get("quantizer")
        if q is None or self._quantizer is not None:
            return self._quantizer
        data = storage.read_bytes(storage.join(self.uri, q["file"]))
        if bytes_sha256(data) != q["sha256"]:
            raise BankError(f"{q['file']} of bank {self.uri} does not match its sha256 in the manifest")
        self._quantizer = MemoryQuantizer.from_bytes(data, q["factory"], self.config.head_dim)
        return self._quantizer

    @property
    def deleted_rows(self) -> set[int]:
        return self._deleted

    def is_deleted(self, row: int) -> bool:
        return int(row) in self._deleted

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows -> (shard index, row inside the shard)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            bad = rows[(rows < 0) | (rows >= len(self))][0]
            raise IndexError(f"row {bad} is outside bank {self.uri} ({len(self)} rows)")
        shard = np.searchsorted(self._offsets, rows, side="right") - 1
        return shard, rows - self._offsets[shard]

    # text side -------------------------------------------------------------------------------------------------
    def _table(self, shard: int, columns: list[str] | None = None):
        name = self.shards[shard]["name"]
        if columns is not None:  # a column scan (ids, embeddings): not worth caching whole
            return read_shard_table(self.uri, name, columns)
        with self._lock:
            if shard in self._tables:
                self._tables.move_to_end(shard)
                return self._tables[shard]
        table = read_shard_table(self.uri, name)
        if table.num_rows != self.shards[shard]["rows"]:
            raise BankError(f"shard {self.shards[shard]['name']}: metadata has {table.num_rows} rows, "
                            f"manifest says {self.shards[shard]['rows']}")
        with self._lock:
            self._tables[shard] = table
            while len(self._tables) > 32:
                self._tables.popitem(last=False)
        return table

    def _column(self, name: str) -> list:
        out = []
        for i in range(len(self.shards)):
            out.extend(self._table(i, [name]).column(name).to_pylist())
        return out

    def reference_ids(self) -> list[str]:
        if self._ids is None:
            self._ids = self._column("id")
        return self._ids

    def doc_ids(self) -> list[str]:
        if self._doc_ids is None:
            self._doc_ids = self._column("doc_id")
        return self._doc_ids

    def row_of(self, ref_id: str) -> int:
        if self._row_of is None:
            self._row_of = {rid: row for row, rid in enumerate(self.reference_ids())}
        try:
            return self._row_of[ref_id]
        except KeyError:
            raise KeyError(f"no reference {ref_id!r} in bank {self.uri}") from None

    def records(self, rows: Sequence[int]) -> list[dict]:
        """{"id", "doc_id", "text", "tokens", "metadata"} per row, in the order asked."""
        shards, local = self.locate(np.asarray(rows))
        out = []
        for s, r in zip(shards.tolist(), local.tolist()):
            row = self._table(s).slice(r, 1).to_pylist()[0]
            out.append({"id": row["id"], "doc_id": row["doc_id"], "text": row["text"], "tokens": row["tokens"],
                        "metadata": json.loads(row["metadata"] or "{}")})
        return out

    def embeddings(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """Retrieval embeddings (N, d) float32 of `rows` (default: all, in row order); reads only their shards."""
        dim = int(self.manifest["embedder"]["dim"])
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), dim), dtype=np.float32)
        shards, local = self.locate(rows)
        for s in np.unique(shards).tolist():
            column = self._table(s, ["embedding"]).column("embedding").combine_chunks()
            at = np.flatnonzero(shards == s)
            out[at] = np.asarray(column.flatten(), dtype=np.float32).reshape(-1, dim)[local[at]]
        return out

    def live_rows(self) -> np.ndarray:
        return np.setdiff1d(np.arange(len(self), dtype=np.int64), np.fromiter(self._deleted, np.int64))

    # memory side -----------------------------------------------------------------------------------------------
    def _shard_file(self, shard: int, ext: str) -> str:
        return shard_uri(self.uri, self.shards[shard]["name"], ext)

    def _memmap(self, shard: int) -> np.memmap:
        mm = self._maps.get(shard)
        if mm is None:
            entry = self.shards[shard]
            path = self._shard_file(shard, "mem")
            fs, local = storage.filesystem(path)
            if not fs.exists(local):
                raise BankError(f"shard {entry['name']}: {path} is missing")
            size = fs.size(local)
            if size != entry["rows"] * self.layout.record_bytes:
                raise BankError(f"shard {entry['name']}: {path} has {size} bytes, manifest expects "
                                f"{entry['rows']} x {self.layout.record_bytes}")
            mm = np.memmap(local, dtype=np.uint8, mode="r", shape=(entry["rows"], self.layout.record_bytes))
            self._maps[shard] = mm
        return mm

    def _read_remote(self, shard: int, local_rows: np.ndarray) -> np.ndarray:
        """One ranged GET per run of consecutive rows, runs fetched in parallel."""
        rb = self.layout.record_bytes
        order = np.argsort(local_rows, kind="stable")
        sorted_rows = local_rows[order]
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        runs = np.split(sorted_rows, breaks)
        uri = self._shard_file(shard, "mem")
        name = self.shards[shard]["name"]

        def get(run: np.ndarray) -> np.ndarray:
            data = storage.read_range(uri, int(run[0]) * rb, len(run) * rb)
            if len(data) != len(run) * rb:
                raise BankError(f"shard {name}: short read at row {int(run[0])} (file truncated?)")
            return np.frombuffer(data, dtype=np.uint8).reshape(len(run), rb)

        chunks = list(self._io.map(get, runs)) if len(runs) > 1 else [get(runs[0])]
        out = np.empty((len(local_rows), rb), dtype=np.uint8)
        out[order] = np.concatenate(chunks)
        return out

    def read_records(self, rows: Sequence[int], check: bool = True) -> np.ndarray:
        """Raw records (N, record_bytes) for global rows, in the order asked; reads only those records."""
        rows = np.asarray(rows, dtype=np.int64)
        shards, local = self.locate(rows)
        out = np.empty((len(rows), self.layout.record_bytes), dtype=np.uint8)
        remote = self._io is not None
        for s in np.unique(shards).tolist():
            at = np.flatnonzero(shards == s)
            out[at] = self._read_remote(s, local[at]) if remote else self._memmap(s)[local[at]]
        if check:
            check_records(out, rows.tolist(), [self.shards[s]["name"] for s in shards.tolist()])
        return out

    def memories(self, rows: Sequence[int], check: bool = True) -> tuple[Tensor, Tensor]:
        """Decoded memories (N, L_mem, 2, Hkv, k, D) and n_valid (N,), uncached (see MemoryStore)."""
        return self.layout.decode(self.read_records(rows, check), self.quantizer)

    # integrity -------------------------------------------------------------------------------------------------
    def verify(self) -> dict:
        """Check every shard's size and sha256 (records and metadata), the codebooks and the index file."""
        total_bytes = 0
        for entry in self.shards:
            for ext, key in (("mem", "mem"), ("parquet", "meta")):
                path = shard_uri(self.uri, entry["name"], ext)
                if not storage.exists(path):
                    raise BankError(f"shard {entry['name']}: {path} is missing")
                sha, size = file_sha256(path)
                if size != entry[f"{key}_bytes"]:
                    raise BankError(f"shard {entry['name']}: {path} has {size} bytes, manifest says "
                                    f"{entry[f'{key}_bytes']}")
                if sha != entry[f"{key}_sha256"]:
                    raise BankError(f"shard {entry['name']}: {path} fails its sha256 check (corrupt)")
                total_bytes += size
            if entry["mem_bytes"] != entry["rows"] * self.layout.record_bytes:
                raise BankError(f"shard {entry['name']}: {entry['mem_bytes']} bytes is not "
                                f"{entry['rows']} records of {self.layout.record_bytes}")
        files = [("quantizer", q)] if (q := self.manifest.get("quantizer")) else []
        for key, part in files + [("index", e) for e in index_files(self.manifest.get("index"))]:
            path = storage.join(self.uri, part["file"])
            if not storage.exists(path):
                raise BankError(f"{key} file {path} is missing")
            sha, size = file_sha256(path)
            if sha != part["sha256"]:
                raise BankError(f"{key} file {path} fails its sha256 check (corrupt)")
            total_bytes += size
        bad = [r for r in self._deleted if not 0 <= r < len(self)]
        if bad:
            raise BankError(f"manifest tombstones name rows outside the bank: {bad[:5]}")
        return {"ok": True, "bank": self.uri, "references": len(self),
                "live_references": len(self) - len(self._deleted),
                "deleted": len(self._deleted), "documents": self.manifest["documents"], "shards": len(self.shards),
                "bytes": total_bytes, "record_bytes": self.layout.record_bytes, "codec": self.layout.codec,
                "index": (self.manifest.get("index") or {}).get("factory"), "errors": self.manifest.get("errors", 0)}
