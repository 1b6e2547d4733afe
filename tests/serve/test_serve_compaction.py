"""The retriever and memory-store replicas across a compaction, without a cluster: the deployment classes run
in-process on a real bank that is compacted under them (the files of the version they opened are removed)."""
from __future__ import annotations

import shutil

import torch

from bank.compact import compact_bank
from bank.edits import delete_references
from bank.manifest import read_manifest
from bank.reader import MemoryBank
from serve.bank_version import BankVersion
from serve.memory_store import MemoryStoreDeployment
from serve.retriever import RetrieverDeployment

PROMPT = "Osaka is a city in Japan. It has a population of about 548 thousand people."


def current_memories(bank_uri: str, ids: list[str]) -> torch.Tensor:
    bank = MemoryBank.open(bank_uri)
    return bank.memories([bank.row_of(i) for i in ids])[0].float()


def test_replicas_answer_from_the_compacted_bank_with_rows_of_either_generation(tiny_bank, tmp_path):
    uri = str(shutil.copytree(tiny_bank, tmp_path / "bank"))
    retriever = RetrieverDeployment.func_or_class(uri, {"embedder": None, "max_batch_size": 8, "batch_wait_s": 0.001})
    store = MemoryStoreDeployment.func_or_class(uri, {"cache_size": 0, "dtype": "float32"})
    doomed = [i for i in MemoryBank.open(uri).reference_ids() if i.startswith("city-0#")]
    delete_references(uri, doomed)
    before = str(BankVersion.of(read_manifest(uri)))
    old_hits = retriever.search_many([PROMPT], 3, [BankVersion.parse(before)])[0]
    assert old_hits[0]["id"] == "city-1#0" and old_hits[0]["bank_version"] == before

    assert compact_bank(uri)["removed_references"] == len(doomed)
    retriever.retriever.bank._tables.clear()  # shards it has not read yet: their files are gone now
    hits = retriever.search_many([PROMPT], 3, [BankVersion.parse(before)])[0]  # a request that started before the compaction
    assert [h["id"] for h in hits] == [h["id"] for h in old_hits]
    assert hits[0]["bank_version"].startswith("1.")  # re-opened at the compacted version

    for batch in (old_hits, hits, old_hits):  # rows numbered before the compaction, after it, and before again
        ids = [h["id"] for h in batch]
        memories, _ = store.fetch([h["row"] for h in batch], batch[0]["bank_version"], ids)
        torch.testing.assert_close(memories, current_memories(uri, ids), atol=0, rtol=0)
    assert store.memories.version.generation == 1
