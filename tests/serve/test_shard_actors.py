"""Sharded retrieval through real Ray actors (serve/shard_actors.py): two shards of a real FAISS index, searched
in parallel, return what one index over all rows returns."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from bank.index import filled, trained_index, write_index_file
from serve.shard_actors import RemoteShards

from test_index_shards import clustered  # tests/bank is on sys.path (tests/conftest.py)


@pytest.mark.parametrize("factory,nprobe", [("Flat", 16), ("IVF64,PQ8", 4)])
def test_two_shard_actors_return_what_one_index_returns(ray_local, tmp_path, factory, nprobe):
    x, queries = clustered(6000), clustered(40, seed=1)
    rows = np.arange(len(x), dtype=np.int64)
    template = trained_index(x, factory)
    whole = filled(template, x, rows)
    info = write_index_file(str(tmp_path), filled(template, x, rows, shards=2), factory, nprobe)
    remote = RemoteShards(str(tmp_path), info, num_cpus=0.5)
    try:
        assert len(remote.actors) == 2 and remote.ntotal == len(x)
        ivf = faiss.try_extract_index_ivf(whole)
        if ivf is not None:
            ivf.nprobe = nprobe
        want_d, want = whole.search(queries, 5)
        got_d, got = remote.search(queries, 5)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-5)
        remote.set_search(64, 1)  # every list: an IVF-Flat-like scan of all codes, still one index's answer
        if ivf is not None:
            ivf.nprobe = 64
            np.testing.assert_array_equal(remote.search(queries, 5)[1], whole.search(queries, 5)[1])
    finally:
        remote.close()


def test_retriever_replica_searches_its_shard_actors_and_renews_them(ray_local, tiny_bank, tmp_path):
    """The Retriever deployment class, in-process, on a bank indexed with 2 shards: one actor per shard, the same
    hits as the in-process ShardSet, and new actors (old ones gone) after an edit changes the bank version."""
    import shutil

    from bank.edits import delete_references
    from bank.index import Retriever, update_index
    from bank.manifest import read_manifest
    from serve.bank_version import BankVersion
    from serve.retriever import RetrieverDeployment

    uri = str(shutil.copytree(tiny_bank, tmp_path / "bank"))
    update_index(uri, "Flat", shards=2)
    settings = {"embedder": None, "max_batch_size": 8, "batch_wait_s": 0.001, "shard_num_cpus": 0.1}
    replica = RetrieverDeployment.func_or_class(uri, settings)
    assert replica.info()["index_shard_actors"] == 2
    queries = ["Osaka is a city in Japan.", "Lima is the capital of Peru."]
    local = Retriever.open(uri, replica.embedder)
    hits = replica.search_many(queries, 3, [None, None])
    assert [[h["row"] for h in q] for q in hits] == local.search(queries, 3)
    first, old_actors = hits[0][0], list(replica.shards.actors)
    delete_references(uri, [first["id"]])
    again = replica.search_many(queries[:1], 3, [BankVersion.of(read_manifest(uri))])[0]
    assert first["id"] not in [h["id"] for h in again] and replica.shards.actors != old_actors
    with pytest.raises(Exception):  # the previous version's actors were killed
        ray_local.get(old_actors[0].ntotal.remote(), timeout=30)
    replica.shards.close()
