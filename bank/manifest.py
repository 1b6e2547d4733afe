"""A bank's manifest and shards: how a bank is created, how shards are written and committed (docs/bank-format.md).

Every write is atomic and the manifest is written last, so a reader sees the bank before a change or after it.
"""
from __future__ import annotations

import io
import json
import re

import numpy as np

from bank import storage
from bank.chunking import Reference
from bank.format import (FORMAT, MANIFEST, QUANTIZER, SHARDS, VERSION, BankError, RecordLayout, bytes_sha256)
from model.config import ModelConfig
from model.quantizer import MemoryQuantizer

_GENERATION = re.compile(r"-g\d+$")  # compacted shards: <part>-g<generation> (bank/compact.py)


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


def index_files(info: dict | None) -> list[dict]:
    """The file entries ({"file", "sha256", "bytes", ...}) of a manifest's index: one, one per shard, or none."""
    if not info:
        return []
    return list(info["shards"]) if info.get("shards") else [info]


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
    if not (len(references) == len(records) == len(embeddings)):
        raise ValueError("references, records and embeddings differ in length")
    n_valid = np.ascontiguousarray(records[:, :4]).view("<u4")[:, 0]
    return write_shard_table(bank_uri, name, metadata_table(references, n_valid, embeddings), records)


def write_shard_table(bank_uri: str, name: str, table, records: np.ndarray, **marker_extra) -> dict:
    """Write records (N, record_bytes) and their metadata table (N rows, `metadata_table`'s columns), then the
    commit marker (with `marker_extra` keys). Used by encoding (write_shard) and compaction (bank/compact.py)."""
    import pyarrow.parquet as pq

    if table.num_rows != len(records):
        raise ValueError("records and metadata differ in length")
    mem = memoryview(np.ascontiguousarray(records, dtype=np.uint8).reshape(-1))  # hashed and written, not copied
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    meta = buf.getvalue()
    storage.write_bytes(shard_uri(bank_uri, name, "mem"), mem)
    storage.write_bytes(shard_uri(bank_uri, name, "parquet"), meta)
    doc_ids = list(dict.fromkeys(table.column("doc_id").to_pylist()))
    tokens = table.column("tokens").combine_chunks().value_lengths() if table.num_rows else []
    marker = {"name": name, "rows": table.num_rows, "documents": len(doc_ids), "doc_ids": doc_ids,
              "tokens": int(sum(int(n) for n in np.asarray(tokens))),
              "mem_bytes": len(mem), "mem_sha256": bytes_sha256(mem),
              "meta_bytes": len(meta), "meta_sha256": bytes_sha256(meta), **marker_extra}
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


def source_part(shard: str) -> str:
    """The encode part a shard holds rows of: compacted shards are named `<part>-g<generation>`."""
    return _GENERATION.sub("", shard)


def completed_parts(bank_uri: str) -> frozenset[str]:
    """Names of the encode parts already in the bank (complete shards, and the parts compacted shards came
    from), so a re-run of `memory3 encode` never re-adds a part whose deleted rows compaction removed."""
    names = list_shard_markers(bank_uri)
    return frozenset(names) | {source_part(n) for n in names}


def read_shard_table(bank_uri: str, name: str, columns: list[str] | None = None):
    """A shard's metadata (pyarrow Table), optionally only some columns."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(shard_uri(bank_uri, name, "parquet"))), columns=columns)


def manifest_entry(marker: dict) -> dict:
    return {k: v for k, v in marker.items() if k != "doc_ids"}
