"""Retrieval (bank/index.py) and live edits (bank/edits.py): real FAISS, real
embedder, banks written in-process."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
from omegaconf import OmegaConf

from bank.edits import append_documents, delete_references
from bank.index_shards import remove_ids
from bank.index import Retriever, build_index, index_rows, needed_training_points, renumber_rows, update_index
from bank.manifest import read_manifest
from bank.reader import MemoryBank
from model.checkpoint import load_checkpoint
from test_bank import _one_thread, build_bank, embedder, make_documents, tiny_checkpoint  # noqa: F401 (fixtures)


def first_sentence(text: str) -> str:
    return re.split(r"(?<=\.) ", text)[0]


@pytest.fixture(scope="module")
def pristine_bank(tmp_path_factory, tiny_checkpoint, embedder) -> str:
    return build_bank(str(tmp_path_factory.mktemp("index") / "bank"), tiny_checkpoint, make_documents(40), embedder)


@pytest.fixture
def bank40(pristine_bank, tmp_path) -> str:
    """A private copy: the tests below append, delete and rebuild."""
    return str(shutil.copytree(pristine_bank, tmp_path / "bank"))


def test_embedder_gives_unit_vectors(embedder):
    x = embedder.encode(["Velmora is a city in Peru.", "Oskarby is a town in Sweden."])
    assert x.shape == (2, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_retrieval_returns_the_reference_a_query_comes_from(bank40, embedder):
    bank = MemoryBank.open(bank40)
    retriever = Retriever.open(bank40, embedder)
    assert bank.manifest["index"]["factory"] == "Flat" and retriever.index.ntotal == len(bank)
    rows = list(range(len(bank)))
    records = bank.records(rows)
    queries = [first_sentence(r["text"]) for r in records]
    top = retriever.search(queries, k=3)
    assert all(len(t) == 3 and len(set(t)) == 3 for t in top)
    hits1 = sum(t[0] == row or records[t[0]]["doc_id"] == records[row]["doc_id"] for row, t in zip(rows, top))
    hits3 = sum(any(records[x]["doc_id"] == records[row]["doc_id"] for x in t) for row, t in zip(rows, top))
    assert hits1 / len(rows) >= 0.9 and hits3 == len(rows), (hits1, hits3, len(rows))
    # a chunk's exact text retrieves that exact chunk
    exact = retriever.search([r["text"] for r in records], k=1)
    assert sum(e[0] == row for row, e in zip(rows, exact)) / len(rows) >= 0.95


def test_excluded_documents_are_never_returned(bank40, embedder):
    bank = MemoryBank.open(bank40)
    retriever = Retriever.open(bank40, embedder)
    rec = bank.records([bank.row_of("city-5#0")])[0]
    [top] = retriever.search([rec["text"]], k=5)
    assert bank.doc_ids()[top[0]] == "city-5"
    [filtered] = retriever.search([rec["text"]], k=5, exclude_doc_ids=[{"city-5"}])
    assert len(filtered) == 5 and all(bank.doc_ids()[r] != "city-5" for r in filtered)
    with pytest.raises(ValueError, match="one set per query"):
        retriever.search(["a", "b"], k=1, exclude_doc_ids=[set()])


def test_delete_tombstones_and_removes_from_index(bank40, embedder):
    bank = MemoryBank.open(bank40)
    doomed = [i for i in bank.reference_ids() if i.startswith("city-10#")]
    assert len(doomed) > 1  # a multi-chunk document
    text = bank.records([bank.row_of(doomed[0])])[0]["text"]
    mem_before = {p.name: p.read_bytes() for p in Path(bank40, "shards").glob("*.mem")}
    assert delete_references(bank40, doomed) == len(doomed)
    assert delete_references(bank40, doomed[:1]) == 0  # already deleted
    with pytest.raises(ValueError, match="unknown reference"):
        delete_references(bank40, ["city-999#0"])
    bank = MemoryBank.open(bank40, verify=True)
    rows = [bank.row_of(i) for i in doomed]
    assert all(bank.is_deleted(r) for r in rows) and sorted(bank.manifest["tombstones"]) == sorted(rows)
    assert bank.manifest["live_references"] == len(bank) - len(doomed)
    retriever = Retriever.open(bank40, embedder)
    assert retriever.index.ntotal == len(bank) - len(doomed)
    assert not set(rows) & set(index_rows(retriever.index).tolist())
    [top] = retriever.search([text], k=len(bank))
    assert not set(rows) & set(top) and len(top) == len(bank) - len(doomed)
    # rows keep their numbers and memories stay readable by row (tombstones only hide them)
    assert {p.name: p.read_bytes() for p in Path(bank40, "shards").glob("*.mem")} == mem_before
    assert len(list(Path(bank40).glob("index-*.faiss"))) == 1  # the old index file is gone


def test_append_documents_adds_shards_and_index_rows(bank40, tiny_checkpoint, embedder):
    before = MemoryBank.open(bank40)
    n_before, ids_before = len(before), before.reference_ids()
    files_before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(bank40, "shards").iterdir()}
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    new_docs = make_documents(6, start=200)
    new_ids = append_documents(bank40, new_docs, model, tokenizer, embedder)
    assert new_ids[0] == "city-200#0" and all(i.split("#")[0] in {d["id"] for d in new_docs} for i in new_ids)
    bank = MemoryBank.open(bank40, verify=True)
    assert len(bank) == n_before + len(new_ids) and bank.reference_ids()[:n_before] == ids_before
    for name, sha in files_before.items():  # old shards untouched
        assert hashlib.sha256(Path(bank40, "shards", name).read_bytes()).hexdigest() == sha
    retriever = Retriever.open(bank40, embedder)
    assert retriever.index.ntotal == len(bank)
    [top] = retriever.search([first_sentence(new_docs[3]["text"])], k=1)
    assert bank.doc_ids()[top[0]] == "city-203"
    with pytest.raises(ValueError, match="already in the bank"):
        append_documents(bank40, new_docs[:1], model, tokenizer, embedder)
    with pytest.raises(ValueError, match="invalid document"):
        append_documents(bank40, [{"id": "x", "text": ""}], model, tokenizer, embedder)
    assert len(MemoryBank.open(bank40)) == len(bank)  # nothing written by the failed calls


def test_ivf_index_on_clustered_vectors():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32)).astype(np.float32)
    x = (centers[rng.integers(0, 40, 4000)] + 0.05 * rng.normal(size=(4000, 32))).astype(np.float32)
    rows = np.arange(10, 4010)
    index = build_index(x, rows, "IVF32,Flat", use_gpu=False)
    faiss.extract_index_ivf(index).nprobe = 4
    queries = x[:200].copy()
    faiss.normalize_L2(queries)
    _, found = index.search(queries, 1)
    assert (found[:, 0] == rows[:200]).mean() > 0.9  # near-duplicates aside, a vector finds itself
    remove_ids(index, rows[:100])
    assert index.ntotal == 3900 and not set(index_rows(index)) & set(rows[:100].tolist())
    # the IVF's list ids (IDMap positions) were renumbered with the IDMap: vectors still find their own rows
    _, found = index.search(queries[100:], 1)
    assert (found[:, 0] == rows[100:200]).mean() > 0.9
    with pytest.raises(ValueError, match="needs at least 4096"):
        build_index(x[:100], rows[:100], "IVF4096,PQ8")
    with pytest.raises(ValueError, match="cannot build index"):
        build_index(x, rows, "NotAFactory")


def test_index_command_rebuilds_with_another_factory(bank40, embedder, capsys):
    from pipelines.index import main

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "index.yaml")
    cfg.bank, cfg.factory, cfg.nprobe = bank40, "IVF4,Flat", 4
    assert main(cfg) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["action"] == "built" and summary["factory"] == "IVF4,Flat"
    manifest = read_manifest(bank40)
    assert manifest["index"]["factory"] == "IVF4,Flat" and manifest["index"]["nprobe"] == 4
    bank = MemoryBank.open(bank40, verify=True)
    retriever = Retriever.open(bank40, embedder)
    assert faiss.extract_index_ivf(retriever.index).nprobe == 4
    rec = bank.records([bank.row_of("city-7#0")])[0]
    assert retriever.search([rec["text"]], k=1)[0][0] == bank.row_of("city-7#0")
    assert update_index(bank40, "IVF4,Flat", nprobe=4)["action"] == "unchanged"


def test_sharded_index_searches_edits_and_compacts_like_one(bank40, embedder):
    """`update_index(shards=2)`: two shard files by row range, searched (ShardSet), edited, verified and
    compacted through the same calls as one index, with the same answers as the exact single index."""
    from bank.compact import compact_bank
    from bank.index_shards import ShardSet

    bank = MemoryBank.open(bank40)
    records = bank.records(list(range(len(bank))))
    queries = [first_sentence(r["text"]) for r in records]
    want = Retriever.open(bank40, embedder).search(queries, k=4)
    info = update_index(bank40, "Flat", shards=2)
    assert info["action"] == "built" and len(info["shards"]) == 2 and info["rows"] == len(bank)
    retriever = Retriever.open(bank40, embedder)
    assert isinstance(retriever.index, ShardSet) and retriever.search(queries, k=4) == want
    assert sorted(p.name for p in Path(bank40).glob("index-*.faiss")) == \
        sorted(e["file"] for e in info["shards"])  # the single index's file is gone
    assert MemoryBank.open(bank40).verify()["ok"]

    last = bank.reference_ids()[-1]  # in the second shard
    assert delete_references(bank40, [last]) == 1
    manifest = read_manifest(bank40)
    assert len(manifest["index"]["shards"]) == 2 and manifest["index"]["rows"] == len(bank) - 1
    assert update_index(bank40, "Flat")["action"] == "unchanged"  # shards=None keeps the split
    compact_bank(bank40)
    compacted = MemoryBank.open(bank40)
    assert compacted.verify()["ok"] and len(compacted) == len(bank) - 1
    kept = [q for q, r in zip(queries, records) if r["id"] != last]
    got = Retriever.open(bank40, embedder).search(kept, k=1)
    assert [compacted.reference_ids()[g[0]] for g in got] == [bank.reference_ids()[w[0]] for w, r in
                                                              zip(want, records) if r["id"] != last]
    assert len(list(Path(bank40).glob("index-*.faiss"))) == 2


def clustered(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors around 100 centres with noise in an 8-dim subspace: what PQ8 alone orders poorly."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(100, d)).astype(np.float32)
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(d, 8)))[0].T.astype(np.float32)
    x = centres[rng.integers(0, 100, n)] + 0.5 * rng.normal(size=(n, 8)).astype(np.float32) @ basis
    faiss.normalize_L2(x)
    return x


def test_refine_k_factor_raises_recall_through_the_retriever():
    """IVF-PQ8 alone finds about a tenth of the exact top-5; a Refine(SQ8) stage re-scoring 10 × k candidates
    finds most of it. The Retriever applies the manifest's refine_k_factor (and nprobe) to the index."""
    x, queries = clustered(10_000), clustered(100, seed=1)
    exact = np.argsort(-(queries @ x.T), axis=1)[:, :5]
    rows = np.arange(10_000)
    factory = "IVF32,PQ8,Refine(SQ8)"
    assert needed_training_points(factory) == 256 and needed_training_points("IVF4096,PQ32,RFlat") == 4096
    index = build_index(x, rows, factory, use_gpu=False)
    bank = SimpleNamespace(deleted_rows=set(), uri="synthetic", manifest={})
    recall = {}
    for k_factor in (1, 10):
        bank.manifest = {"index": {"factory": factory, "dim": 64, "nprobe": 8, "refine_k_factor": k_factor}}
        retriever = Retriever(bank, index, SimpleNamespace(dim=64, name="synthetic"))
        assert faiss.downcast_index(index.index).k_factor == k_factor and faiss.extract_index_ivf(index).nprobe == 8
        found = retriever.search_embeddings(queries, 5)
        recall[k_factor] = np.mean([len(set(f) & set(e)) / 5 for f, e in zip(found, exact.tolist())])
    assert recall[1] < 0.3 and recall[10] > recall[1] + 0.3, recall
    # FAISS cannot remove rows from a Refine index: compaction asks for a rebuild instead of corrupting it
    with pytest.raises(RuntimeError):
        remove_ids(index, rows[:3])
    assert index.ntotal == 10_000
    new_row = np.arange(10_000)
    new_row[:3] = -1
    with pytest.raises(ValueError, match="rebuild it first"):
        renumber_rows(index, new_row)


def test_refine_index_is_built_appended_deleted_sharded_and_compacted(bank40, tiny_checkpoint, embedder):
    """Every index operation of the bank with a Refine factory: appends add rows, a delete rebuilds (FAISS
    cannot remove from IndexRefine), shards and compaction keep refine_k_factor and the answers."""
    from bank.compact import compact_bank
    from bank.index_shards import ShardSet

    factory = "IVF4,PQ8x4,Refine(SQfp16)"
    info = update_index(bank40, factory, nprobe=4, refine_k_factor=6)
    assert info["action"] == "built" and info["refine_k_factor"] == 6
    assert update_index(bank40, factory, nprobe=4, refine_k_factor=6)["action"] == "unchanged"

    def check(expect_rows: int) -> MemoryBank:
        bank = MemoryBank.open(bank40, verify=True)
        retriever = Retriever.open(bank40, embedder)
        shards = retriever.index.shards if isinstance(retriever.index, ShardSet) else [retriever.index]
        assert retriever.index.ntotal == expect_rows and bank.manifest["index"]["refine_k_factor"] == 6
        assert all(faiss.downcast_index(s.index).k_factor == 6 for s in shards)
        live = [r for r in range(len(bank)) if not bank.is_deleted(r)]
        records = bank.records(live)
        got = retriever.search([r["text"] for r in records], k=1)
        assert np.mean([g[0] == row for g, row in zip(got, live)]) >= 0.9
        return bank

    n = len(check(len(MemoryBank.open(bank40))))
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    added = append_documents(bank40, make_documents(3, start=300), model, tokenizer, embedder)
    check(n + len(added))
    doomed = [i for i in MemoryBank.open(bank40).reference_ids() if i.startswith("city-3#")]
    assert delete_references(bank40, doomed) == len(doomed)
    bank = check(n + len(added) - len(doomed))
    assert not {bank.row_of(i) for i in doomed} & set(index_rows(Retriever.open(bank40, embedder).index).tolist())
    assert update_index(bank40, factory, nprobe=4, refine_k_factor=6, shards=2)["action"] == "built"
    check(n + len(added) - len(doomed))
    compact_bank(bank40)
    assert len(check(n + len(added) - len(doomed))) == n + len(added) - len(doomed)
