"""Compaction (bank/compact.py): deleted documents leave every file of the bank; a killed compaction leaves the old
version readable and a rerun finishes it; a corrupt shard is reported and left untouched. No Ray."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

import bank.compact as compact
from bank.compact import compact_bank
from bank.edits import delete_references
from bank.format import HEADER_BYTES
from bank.index import Retriever, index_rows
from bank.manifest import completed_parts, read_manifest, read_shard_table
from bank.reader import MemoryBank
from test_bank import _one_thread, build_bank, embedder, make_documents, tiny_checkpoint  # noqa: F401 (fixtures)

DOOMED_DOCS = ("city-3", "city-10")  # shards 0 and 1 of three (8 documents per shard); city-10 is multi-chunk


@pytest.fixture(scope="module", params=["bf16", "OPQ8_32,PQ8x8"])
def pristine(request, tmp_path_factory, tiny_checkpoint, embedder) -> str:
    quantizer = None if request.param == "bf16" else request.param
    return build_bank(str(tmp_path_factory.mktemp("compact") / "bank"), tiny_checkpoint, make_documents(24),
                      embedder, quantizer=quantizer)


@pytest.fixture
def bank24(pristine, tmp_path) -> str:
    return str(shutil.copytree(pristine, tmp_path / "bank"))


def snapshot(uri: str, doc_ids) -> dict:
    """What a deleted document leaves in the bank: ids, texts, tokens, embeddings and memory records."""
    bank = MemoryBank.open(uri)
    rows = [r for r, d in enumerate(bank.doc_ids()) if d in doc_ids]
    return {"rows": rows, "ids": [bank.reference_ids()[r] for r in rows],
            "records": bank.records(rows), "embeddings": bank.embeddings(rows),
            "payloads": [bytes(r[HEADER_BYTES:]) for r in bank.read_records(rows)]}


def delete_documents(uri: str, doc_ids) -> dict:
    gone = snapshot(uri, doc_ids)
    assert delete_references(uri, gone["ids"]) == len(gone["ids"])
    return gone


def assert_no_file_holds(uri: str, gone: dict) -> None:
    """Every file under the bank read back — shard metadata decompressed column by column, memory records, the
    index's vectors and ids, every text file — holds nothing of the deleted documents."""
    bank = MemoryBank.open(uri)
    record_bytes = bank.layout.record_bytes
    texts = [r["text"] for r in gone["records"]]
    tokens = [r["tokens"] for r in gone["records"]]
    files = sorted(p for p in Path(uri).rglob("*") if p.is_file())
    for path in files:
        if path.suffix == ".parquet":
            table = pq.read_table(io.BytesIO(path.read_bytes())).to_pydict()
            assert not set(table["id"]) & set(gone["ids"]), path
            assert not set(table["text"]) & set(texts), path
            assert not [t for t in table["tokens"] if t in tokens], path
            emb = np.asarray(table["embedding"], dtype=np.float32).reshape(-1, gone["embeddings"].shape[1])
            assert not any((emb == e).all(1).any() for e in gone["embeddings"]), path
        elif path.suffix == ".mem":
            data = path.read_bytes()
            assert len(data) % record_bytes == 0, path
            payloads = {bytes(r[HEADER_BYTES:]) for r in np.frombuffer(data, np.uint8).reshape(-1, record_bytes)}
            assert not payloads & set(gone["payloads"]), path
        elif path.name.startswith("index-"):
            index = faiss.read_index(str(path))
            vectors = faiss.downcast_index(index).index.reconstruct_n(0, index.ntotal)
            unit = gone["embeddings"] / np.linalg.norm(gone["embeddings"], axis=1, keepdims=True)
            assert np.abs(vectors @ unit.T).max() < 0.9999, path  # no deleted embedding left in the index
            assert index_rows(index).max() < len(bank), path
        elif path.suffix in (".json", ".jsonl"):
            text = path.read_text()
            assert not any(t in text for t in texts + gone["ids"]), path
            assert not any(f'"{d}"' in text for d in DOOMED_DOCS), path


def test_compaction_erases_deleted_documents_from_every_file(bank24, embedder):
    before = MemoryBank.open(bank24)
    kept_ids = [i for i in before.reference_ids() if i.split("#")[0] not in DOOMED_DOCS]
    kept_records = {i: bytes(before.read_records([before.row_of(i)])[0]) for i in kept_ids}
    old_names = [s["name"] for s in before.shards]
    gone = delete_documents(bank24, DOOMED_DOCS)

    summary = compact_bank(bank24)
    assert summary["ok"] and summary["shards_rewritten"] == 2 and summary["failed_shards"] == []
    assert summary["removed_references"] == len(gone["ids"]) and summary["tombstones"] == 0
    assert summary["bytes_after"] < summary["bytes_before"] and summary["generation"] == 1

    assert_no_file_holds(bank24, gone)
    bank = MemoryBank.open(bank24, verify=True)
    assert bank.manifest["generation"] == 1 and bank.manifest["tombstones"] == []
    assert [s["name"] for s in bank.shards] == [old_names[0] + "-g1", old_names[1] + "-g1", old_names[2]]
    assert bank.reference_ids() == kept_ids  # surviving references keep their order, renumbered
    assert {i: bytes(bank.read_records([bank.row_of(i)])[0]) for i in kept_ids} == kept_records
    retriever = Retriever.open(bank24, embedder)
    assert sorted(index_rows(retriever.index).tolist()) == list(range(len(kept_ids)))
    for doc in make_documents(6, start=4):  # the index's renumbered ids still point at the right texts
        [top] = retriever.search([doc["text"]], k=1)
        assert bank.records(top)[0]["doc_id"] == doc["id"]
    # a re-run of `memory3 encode` on the same corpus must not re-add the parts compaction rewrote
    assert set(old_names) <= completed_parts(bank24)
    again = compact_bank(bank24)
    assert again["ok"] and again["shards_rewritten"] == 0 and again["generation"] == 1


def test_compaction_killed_before_its_commit_leaves_the_old_version_and_a_rerun_finishes(bank24, monkeypatch):
    gone = delete_documents(bank24, DOOMED_DOCS)
    manifest = read_manifest(bank24)

    def killed_after_one(bank_uri, tasks, record_bytes):
        compact.rewrite_shard(bank_uri, tasks[0], record_bytes)
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        compact_bank(bank24, killed_after_one)
    assert read_manifest(bank24) == manifest  # the old version, complete and readable
    assert MemoryBank.open(bank24, verify=True).records(gone["rows"][:1])[0]["id"] == gone["ids"][0]

    summary = compact_bank(bank24)
    assert summary["ok"] and summary["shards_reused"] == 1 and summary["shards_rewritten"] == 1
    assert_no_file_holds(bank24, gone)


def test_compaction_killed_after_its_commit_is_cleaned_up_by_a_rerun(bank24, monkeypatch):
    gone = delete_documents(bank24, DOOMED_DOCS)
    real = compact.remove_replaced_files
    calls = []

    def killed_on_cleanup(bank_uri, manifest, keep=()):
        calls.append(1)
        if len(calls) == 2:  # the first call runs before the plan, the second after the commit
            raise KeyboardInterrupt("killed")
        return real(bank_uri, manifest, keep)

    monkeypatch.setattr(compact, "remove_replaced_files", killed_on_cleanup)
    with pytest.raises(KeyboardInterrupt):
        compact_bank(bank24)
    monkeypatch.setattr(compact, "remove_replaced_files", real)
    assert MemoryBank.open(bank24, verify=True).manifest["generation"] == 1  # the new version is committed
    summary = compact_bank(bank24)
    assert summary["ok"] and summary["shards_rewritten"] == 0 and summary["files_removed"] == 6
    assert_no_file_holds(bank24, gone)


@pytest.mark.parametrize("damage", ["flip a .mem byte", "truncate the .parquet"])
def test_a_corrupt_shard_is_reported_and_left_untouched(bank24, damage):
    gone = delete_documents(bank24, DOOMED_DOCS)
    bad = read_manifest(bank24)["shards"][1]
    path = Path(bank24, "shards", bad["name"] + (".mem" if "mem" in damage else ".parquet"))
    data = bytearray(path.read_bytes())
    if "flip" in damage:
        data[HEADER_BYTES + 5] ^= 0xFF
    else:
        data = data[:-100]
    path.write_bytes(bytes(data))
    files = {p.name: p.read_bytes() for p in Path(bank24, "shards").glob(bad["name"] + ".*")}

    summary = compact_bank(bank24)
    assert not summary["ok"] and summary["shards_rewritten"] == 1
    [failed] = summary["failed_shards"]
    assert failed["shard"] == bad["name"]
    assert ("sha256" in failed["error"]) if "flip" in damage else ("truncated" in failed["error"])
    assert {p.name: p.read_bytes() for p in Path(bank24, "shards").glob(bad["name"] + ".*")} == files
    manifest = read_manifest(bank24)
    assert manifest["shards"][1]["name"] == bad["name"]
    damaged = manifest["shards"][1]
    still = [i for i in gone["ids"] if i.startswith("city-10#")]  # the damaged shard's deleted rows stay tombstoned
    assert len(manifest["tombstones"]) == len(still)
    assert all(damaged["row_offset"] <= r < damaged["row_offset"] + damaged["rows"] for r in manifest["tombstones"])
    healthy = read_shard_table(bank24, manifest["shards"][0]["name"], ["doc_id"]).column("doc_id").to_pylist()
    assert manifest["shards"][0]["name"].endswith("-g1") and "city-3" not in healthy  # compacted all the same
