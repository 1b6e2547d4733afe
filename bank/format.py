"""The memory bank: sparse explicit memories on disk or S3, read back by row (paper §3.1, §3.3).

Format (docs/bank-format.md): `manifest.json` is the commit point; `shards/<name>.mem` hold fixed-size records
(8-byte header + one reference's memory as bf16 or VQ codes), so any reference is one ranged read at
`row * record_bytes` (np.memmap locally, `storage.read_range` on S3); `shards/<name>.parquet` hold the text side
(id, doc_id, text, tokens, n_valid, embedding, metadata); `shards/<name>.json` mark a shard complete.

The paper puts the inference overhead of explicit memory in loading it (Remark 8: 35% slower decoding, although
reading memories is 0.23% of the compute). `MemoryStore` is that loading path: a RAM cache of recently used
memories (§3.1; LRU here), vectorised reads per shard, one FAISS call to dequantize a batch, and a background
prefetch thread.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import sys
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from model.config import ModelConfig
from model.quantizer import MemoryQuantizer
from pipelines import storage
from pipelines.corpus import Reference

FORMAT, VERSION = "memory3-bank", 1
MANIFEST, QUANTIZER, ERRORS, SHARDS = "manifest.json", "quantizer.faiss", "errors.jsonl", "shards"
HEADER_BYTES = 8  # uint32 n_valid, uint32 crc32 of the payload (little-endian)
WEIGHTS_FILE = "model.safetensors"


class BankError(ValueError):
    """A bank that cannot be used as it is: corrupt shard, wrong model, bad manifest. The message names the part."""


# --- checksums -------------------------------------------------------------------------------------------------

def file_sha256(uri: str, chunk: int = 8 << 20) -> tuple[str, int]:
    """(sha256 hex, size) of a local or remote file, streamed."""
    fs, path = storage.filesystem(uri)
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def weights_sha256(checkpoint_dir: str) -> str:
    """sha256 of the checkpoint's model.safetensors: identifies the weights that wrote a bank (paper App. A
    Remark 9: memories must be rebuilt when the model changes)."""
    uri = storage.join(str(checkpoint_dir), WEIGHTS_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{checkpoint_dir} has no {WEIGHTS_FILE}")
    return file_sha256(uri)[0]


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- record layout ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordLayout:
    """One reference = HEADER_BYTES + vectors * code_size bytes; vectors = L_mem * 2 * Hkv * k, each head_dim wide,
    stored as bf16 (code_size = 2 * head_dim) or as the quantizer's codes (paper App. B: 14 B per vector)."""

    memory_shape: tuple[int, ...]
    codec: str  # "bfloat16" | "faiss"
    code_size: int

    @classmethod
    def create(cls, cfg: ModelConfig, quantizer: MemoryQuantizer | None) -> "RecordLayout":
        if quantizer is None:
            return cls(tuple(cfg.memory_shape), "bfloat16", 2 * cfg.head_dim)
        return cls(tuple(cfg.memory_shape), "faiss", quantizer.code_size)

    @property
    def vectors(self) -> int:
        return math.prod(self.memory_shape[:-1])

    @property
    def payload_bytes(self) -> int:
        return self.vectors * self.code_size

    @property
    def record_bytes(self) -> int:
        return HEADER_BYTES + self.payload_bytes

    def to_dict(self) -> dict:
        return {"memory_shape": list(self.memory_shape), "codec": self.codec, "code_size": self.code_size,
                "header_bytes": HEADER_BYTES, "record_bytes": self.record_bytes, "byte_order": "little"}

    @classmethod
    def from_dict(cls, d: dict) -> "RecordLayout":
        layout = cls(tuple(d["memory_shape"]), d["codec"], int(d["code_size"]))
        if layout.record_bytes != d["record_bytes"] or d.get("header_bytes", HEADER_BYTES) != HEADER_BYTES:
            raise BankError(f"manifest record layout is inconsistent: {d}")
        return layout

    def pack(self, memories: Tensor, n_valid: Tensor, quantizer: MemoryQuantizer | None) -> np.ndarray:
        """memories (N, L_mem, 2, Hkv, k, D), n_valid (N,) -> records (N, record_bytes) uint8."""
        n = memories.shape[0]
        if tuple(memories.shape[1:]) != self.memory_shape:
            raise ValueError(f"memories of shape {tuple(memories.shape[1:])} do not fit layout {self.memory_shape}")
        if self.codec == "bfloat16":
            payload = memories.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy()
            payload = payload.view(np.uint8).reshape(n, self.payload_bytes)
        else:
            payload = quantizer.encode(memories.detach().float().cpu()).reshape(n, self.payload_bytes)
        records = np.empty((n, self.record_bytes), dtype=np.uint8)
        records[:, HEADER_BYTES:] = payload
        header = records[:, :HEADER_BYTES].view("<u4")  # (n, 2)
        header[:, 0] = n_valid.cpu().numpy().astype(np.uint32)
        header[:, 1] = [zlib.crc32(p) for p in payload]
        return records

    def decode(self, records: np.ndarray, quantizer: MemoryQuantizer | None) -> tuple[Tensor, Tensor]:
        """records (N, record_bytes) -> memories (N, *memory_shape) (bf16 as stored, or float32 from the codes)
        and n_valid (N,) int64. Dequantization is one FAISS call for the whole batch."""
        n = records.shape[0]
        n_valid = torch.from_numpy(np.ascontiguousarray(records[:, :4]).view("<u4")[:, 0].astype(np.int64))
        payload = np.ascontiguousarray(records[:, HEADER_BYTES:])
        if self.codec == "bfloat16":
            memories = torch.from_numpy(payload.view(np.int16).reshape(n, *self.memory_shape)).view(torch.bfloat16)
            return memories, n_valid
        memories = quantizer.decode(payload.reshape(n, *self.memory_shape[:-1], self.code_size))
        k = self.memory_shape[3]
        slot_ok = torch.arange(k) < n_valid[:, None]  # (N, k): VQ turns zero padding into noise; zero it again
        return memories * slot_ok[:, None, None, None, :, None], n_valid


def check_records(records: np.ndarray, rows: Sequence[int], where: Sequence[str]) -> None:
    """Compare each record's crc32 with its header: a flipped byte is caught on the read path too."""
    crcs = np.ascontiguousarray(records[:, 4:HEADER_BYTES]).view("<u4")[:, 0]
    for i, rec in enumerate(records):
        if zlib.crc32(rec[HEADER_BYTES:]) != crcs[i]:
            raise BankError(f"corrupt record: row {rows[i]} in shard {where[i]} fails its crc32 check; "
                            f"run `memory3 bank verify bank=...`")


# --- manifest and shard writing --------------------------------------------------------------------------------

def read_manifest(uri: str) -> dict:
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        raise BankError(f"{uri} is not a memory bank: no {MANIFEST}")
    try:
        manifest = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"{path} is corrupt: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BankError(f"{path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
                        f"{FORMAT} v{VERSION}")
    return manifest


def write_manifest(uri: str, manifest: dict) -> dict:
    """Recount, then replace manifest.json atomically: the bank's single commit point."""
    offset = 0
    for shard in manifest["shards"]:
        shard["row_offset"] = offset
        offset += shard["rows"]
    manifest["tombstones"] = sorted(set(manifest["tombstones"]))
    manifest["references"] = offset
    manifest["live_references"] = offset - len(manifest["tombstones"])
    manifest["documents"] = sum(s["documents"] for s in manifest["shards"])
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["bytes"] = sum(s["mem_bytes"] + s["meta_bytes"] for s in manifest["shards"])
    storage.write_text(storage.join(uri, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def create_bank(uri: str, *, config: ModelConfig, model_sha256: str, tokenizer_sha256: str,
                quantizer: MemoryQuantizer | None, embedder: dict, shard_documents: int,
                quantizer_sample: int = 0) -> dict:
    """An empty bank: codebooks (if any) first, then the manifest that points at them."""
    storage.makedirs(uri)
    qinfo = None
    if quantizer is not None:
        data = quantizer.to_bytes()
        storage.write_bytes(storage.join(uri, QUANTIZER), data)
        qinfo = {"factory": quantizer.factory, "file": QUANTIZER, "sha256": bytes_sha256(data), "bytes": len(data),
                 "trained_on_references": quantizer_sample}
    manifest = {
        "format": FORMAT, "version": VERSION,
        "model": config.to_dict(), "model_sha256": model_sha256, "tokenizer_sha256": tokenizer_sha256,
        "record": RecordLayout.create(config, quantizer).to_dict(), "quantizer": qinfo,
        "embedder": embedder, "chunking": {"reference_len": config.reference_len, "shard_documents": shard_documents},
        "shards": [], "tombstones": [], "errors": 0, "index": None,
    }
    return write_manifest(uri, manifest)


def shard_uri(bank_uri: str, name: str, ext: str) -> str:
    return storage.join(bank_uri, SHARDS, f"{name}.{ext}")


def metadata_table(references: list[Reference], n_valid: np.ndarray, embeddings: np.ndarray):
    import pyarrow as pa

    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    return pa.table({
        "id": pa.array([r.id for r in references], pa.string()),
        "doc_id": pa.array([r.doc_id for r in references], pa.string()),
        "text": pa.array([r.text for r in references], pa.string()),
        "tokens": pa.array([r.tokens for r in references], pa.list_(pa.int32())),
        "n_valid": pa.array(n_valid.astype(np.int32), pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1]),
        "metadata": pa.array([json.dumps(r.metadata, sort_keys=True, ensure_ascii=False) for r in references],
                             pa.string()),
    })


def write_shard(bank_uri: str, name: str, references: list[Reference], records: np.ndarray,
                embeddings: np.ndarray) -> dict:
    """Write a shard's records, metadata and (last) its commit marker; returns the marker's content.
    Every write is atomic and every byte is a function of the inputs, so a retried shard is identical."""
    import pyarrow.parquet as pq

    if not (len(references) == len(records) == len(embeddings)):
        raise ValueError("references, records and embeddings differ in length")
    mem = np.ascontiguousarray(records).tobytes()
    n_valid = np.ascontiguousarray(records[:, :4]).view("<u4")[:, 0]
    buf = io.BytesIO()
    pq.write_table(metadata_table(references, n_valid, embeddings), buf, compression="zstd")
    meta = buf.getvalue()
    storage.write_bytes(shard_uri(bank_uri, name, "mem"), mem)
    storage.write_bytes(shard_uri(bank_uri, name, "parquet"), meta)
    doc_ids = list(dict.fromkeys(r.doc_id for r in references))
    marker = {"name": name, "rows": len(references), "documents": len(doc_ids), "doc_ids": doc_ids,
              "tokens": int(sum(len(r.tokens) for r in references)),
              "mem_bytes": len(mem), "mem_sha256": bytes_sha256(mem),
              "meta_bytes": len(meta), "meta_sha256": bytes_sha256(meta)}
    storage.write_text(shard_uri(bank_uri, name, "json"), json.dumps(marker, sort_keys=True) + "\n")
    return marker


def list_shard_markers(bank_uri: str) -> dict[str, dict]:
    """Complete shards (those with a commit marker), by name, whether or not the manifest lists them yet."""
    markers = {}
    for entry in storage.listdir(storage.join(bank_uri, SHARDS)):
        if entry.endswith(".json") and not entry.startswith("."):
            marker = json.loads(storage.read_text(storage.join(bank_uri, SHARDS, entry)))
            markers[marker["name"]] = marker
    return markers


def read_shard_table(bank_uri: str, name: str, columns: list[str] | None = None):
    """A shard's metadata (pyarrow Table), optionally only some columns."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(shard_uri(bank_uri, name, "parquet"))), columns=columns)


def manifest_entry(marker: dict) -> dict:
    return {k: v for k, v in marker.items() if k != "doc_ids"}


# --- reading ---------------------------------------------------------------------------------------------------

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
        for key in ("quantizer", "index"):
            part = self.manifest.get(key)
            if part:
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


# --- the RAM cache ---------------------------------------------------------------------------------------------

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
    recently used explicit memories"). With device='cuda' the cache holds GPU tensors and a second LRU in host
    RAM (`host_cache_size`) catches what the GPU cache evicts, so a miss there costs a copy, not a disk read.
    Misses are read per shard in one vectorised read and dequantized in one FAISS call (App. B)."""

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

    def _load(self, rows: list[int], prefetch: bool = False) -> dict[int, tuple[Tensor, int]]:
        try:
            out: dict[int, tuple[Tensor, int]] = {}
            cold = []
            with self._lock:
                for r in rows:
                    item = self._host.get(r) if self._host is not None else None
                    if item is not None:
                        out[r] = (item[0].to(self.device, non_blocking=True), item[1])
                        self._counts["host_hits"] += 1
                    else:
                        cold.append(r)
            if cold:
                t0 = time.perf_counter()
                records = self.bank.read_records(cold, check=self.check_records)
                t1 = time.perf_counter()
                with faiss_threads(1 if len(cold) * self.bank.layout.vectors <= SMALL_DECODE_VECTORS else None):
                    memories, n_valid = self.bank.layout.decode(records, self.bank.quantizer)
                memories = memories.to(self.dtype)
                t2 = time.perf_counter()
                host = memories.pin_memory() if self._host is not None and torch.cuda.is_available() else memories
                on_device = host.to(self.device, non_blocking=True)
                with self._lock:
                    self._seconds["read"] += t1 - t0
                    self._seconds["decode"] += t2 - t1
                    self._counts["misses" if not prefetch else "prefetched"] += len(cold)
                    self._counts["bytes_read"] += records.nbytes
                    for i, r in enumerate(cold):
                        nv = int(n_valid[i])
                        out[r] = (on_device[i], nv)
                        if self._host is not None:
                            self._host.put(r, (host[i], nv))
            with self._lock:
                for r, item in out.items():
                    self._cache.put(r, item)
            return out
        finally:
            if prefetch:
                with self._lock:
                    for r in rows:
                        self._pending.pop(r, None)

    def stats(self) -> dict:
        with self._lock:
            requested = max(self._counts["rows_requested"], 1)
            return {**self._counts, "hit_rate": self._counts["hits"] / requested,
                    "cached": len(self._cache.items), "capacity": self._cache.capacity,
                    "evictions": self._cache.evictions,
                    "host_cached": len(self._host.items) if self._host is not None else 0,
                    "fetch_seconds": self._seconds["fetch"], "read_seconds": self._seconds["read"],
                    "decode_seconds": self._seconds["decode"], "device": str(self.device),
                    "dtype": str(self.dtype).removeprefix("torch.")}

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True)


# --- `memory3 bank` --------------------------------------------------------------------------------------------

def main(cfg: DictConfig) -> int:
    """`memory3 bank verify|info|delete bank=...`"""
    action = cfg.get("action")
    if action not in ("verify", "info", "delete"):
        raise ValueError("say what to do: `memory3 bank verify|info|delete bank=DIR_OR_S3 [ids=[...]]`")
    if action == "delete":
        from pipelines.encode import delete_references

        n = delete_references(cfg.bank, list(cfg.ids))
        print(json.dumps({"bank": cfg.bank, "deleted": n}))
        return 0
    if action == "info":
        manifest = read_manifest(cfg.bank)
        print(json.dumps({k: v for k, v in manifest.items() if k not in ("shards", "tombstones")}, indent=1))
        return 0
    try:
        summary = MemoryBank.open(cfg.bank).verify()
    except BankError as e:
        print(json.dumps({"ok": False, "bank": cfg.bank, "error": str(e)}))
        print(f"memory3 bank verify: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
