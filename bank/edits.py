"""Live edits of a bank, in-process and without Ray: append documents, delete references (the serve admin API and
`memory3 bank delete`). Existing shards are never rewritten here: an append adds shards and index rows, a delete adds
tombstones, and each edit commits with one manifest write. Compaction (bank/compact.py) removes tombstoned rows.
"""
from __future__ import annotations

import threading

from bank.chunking import Part, chunk_documents, documents_from_dicts
from bank.embedder import Embedder
from bank.format import BankError
from bank.index import index_settings, remove_rows, update_index
from bank.manifest import manifest_entry, write_manifest, write_shard
from bank.reader import MemoryBank
from bank.shard_encoder import ShardEncoder
from model.tokenizer import Tokenizer
from model.transformer import Transformer

_WRITE_LOCKS: dict[str, threading.Lock] = {}


def write_lock(bank_uri: str) -> threading.Lock:
    """The one lock every in-process writer of a bank holds: appends, deletes, compaction."""
    return _WRITE_LOCKS.setdefault(str(bank_uri), threading.Lock())


def append_documents(bank_uri: str, documents: list[dict], model: Transformer, tokenizer: Tokenizer,
                     embedder: Embedder) -> list[str]:
    """Encode new documents {"id", "text", ...} in-process and add them as new shards + index rows, without
    touching existing shards. Returns the new reference ids. One writer per bank at a time (threads of one process
    are serialised); open MemoryBank / Retriever objects must be reopened to see the new rows."""
    with write_lock(bank_uri):
        bank = MemoryBank.open(bank_uri, expect_tokenizer_sha=tokenizer.sha256)
        manifest = bank.manifest
        if model.cfg != bank.config:
            raise BankError(f"bank {bank_uri} was written by a different model shape; re-encode it")
        if embedder.dim != manifest["embedder"]["dim"] or embedder.name != manifest["embedder"]["model"]:
            raise BankError(f"bank {bank_uri} uses embedder {manifest['embedder']}, got {embedder.spec()}")
        docs, errors = documents_from_dicts(documents)
        if errors:
            raise ValueError(f"{len(errors)} invalid document(s), nothing appended: " +
                             "; ".join(f"#{e['row']}: {e['reason']}" for e in errors[:5]))
        known = set(bank.doc_ids())
        clash = [d.id for d in docs if d.id in known]
        if clash:
            raise ValueError(f"document id(s) already in the bank: {clash[:5]}; delete their references first")
        encoder = ShardEncoder(model, tokenizer, bank.layout, bank.quantizer, embedder)
        per_shard = manifest["chunking"]["shard_documents"]
        new_ids: list[str] = []
        for start in range(0, len(docs), per_shard):
            group = docs[start:start + per_shard]
            refs = chunk_documents(group, tokenizer, bank.config.reference_len)
            part = Part("api", -1, len(manifest["shards"]), group, [])
            records, embeddings = encoder.encode(refs)
            manifest["shards"].append(manifest_entry(write_shard(bank_uri, part.shard_name, refs, records, embeddings)))
            new_ids += [r.id for r in refs]
        write_manifest(bank_uri, manifest)
        index = manifest.get("index") or {"factory": "Flat", "nprobe": 16}  # a bank without one gets exact search
        if new_ids:
            update_index(bank_uri, **index_settings(index))
        return new_ids


def delete_references(bank_uri: str, ids: list[str]) -> int:
    """Tombstone references by id in the manifest and drop them from the index; returns how many were newly
    deleted. Unknown ids are an error (nothing is changed). Shard bytes stay: rows keep their numbers."""
    with write_lock(bank_uri):
        bank = MemoryBank.open(bank_uri)
        unknown = []
        rows = []
        for ref_id in ids:
            try:
                rows.append(bank.row_of(ref_id))
            except KeyError:
                unknown.append(ref_id)
        if unknown:
            raise ValueError(f"unknown reference id(s) in {bank_uri}: {unknown[:5]}")
        new = sorted(set(r for r in rows if not bank.is_deleted(r)))
        if not new:
            return 0
        manifest = bank.manifest
        manifest["tombstones"] = manifest["tombstones"] + new
        if manifest.get("index"):
            remove_rows(bank_uri, manifest, new)  # commits the manifest with the new index
        else:
            write_manifest(bank_uri, manifest)
        return len(new)
