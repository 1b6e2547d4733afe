"""The bank format and its read path (bank/format.py, manifest.py, reader.py, store.py): records, manifest,
MemoryStore, verify — no Ray.

Also home of the tiny-checkpoint and document helpers that test_index.py and test_encode.py import.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from bank import chunking, storage
from bank.format import HEADER_BYTES, BankError, RecordLayout, weights_sha256
from bank.manifest import create_bank
from bank.reader import MemoryBank
from bank.store import MemoryStore
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.encoder import encode_references
from model.quantizer import MemoryQuantizer
from model.tokenizer import Tokenizer
from model.transformer import Transformer

SYLLABLES = ["ka", "lo", "mer", "vin", "tas", "ro", "bel", "dun", "sa", "qui", "zor", "fen", "lu", "dra", "mi", "pol"]
COUNTRIES = ["Peru", "Kenya", "Norway", "Japan", "Chile", "Ghana", "Laos", "Malta", "Oman", "Chad"]
RIVERS = ["Amber", "Silver", "Crow", "Lantern", "Willow", "Granite", "Falcon", "Meadow"]


def city_name(i: int) -> str:
    return (SYLLABLES[i % 16] + SYLLABLES[(i // 16) % 16] + SYLLABLES[(i * 7 + 3) % 16]).capitalize()


def make_documents(n: int, start: int = 0, seed: int = 0) -> list[dict]:
    """Distinct city facts (unique names, so a sentence identifies its reference); every 5th is multi-chunk."""
    rng = random.Random(seed + start)
    docs = []
    for i in range(start, start + n):
        name, country = city_name(i), COUNTRIES[rng.randrange(len(COUNTRIES))]
        text = (f"{name} is a city in {country}. It has a population of {rng.randint(1000, 999999)} people. "
                f"{name} lies on the {RIVERS[i % len(RIVERS)]} river.")
        if i % 5 == 0:
            text += "".join(f" In {1800 + 7 * k + i} the people of {name} built bridge number {k} over the "
                            f"{RIVERS[(i + k) % len(RIVERS)]} river." for k in range(8))
        docs.append({"id": f"city-{i}", "text": text, "country": country})
    return docs


_CHECKPOINT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Random-weight tiny model + a tokenizer trained on the test texts (built once per session)."""
    if "path" not in _CHECKPOINT:
        cfg = ModelConfig.from_name("tiny")
        tokenizer = Tokenizer.train([d["text"] for d in make_documents(300)], cfg.vocab_size)
        torch.manual_seed(0)
        _CHECKPOINT["path"] = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", Transformer(cfg).eval(),
                                              tokenizer)
    return _CHECKPOINT["path"]


_EMBEDDER: dict = {}


@pytest.fixture(scope="session")
def embedder(tmp_path_factory):
    """The bundled MiniLM; with MEMORY3_TEST_RANDOM_EMBEDDER=1 (a GPU machine without the model files) one of its
    shape with random weights: the same code path, no retrieval quality."""
    from bank.embedder import Embedder

    if "e" not in _EMBEDDER:
        model = None
        if os.environ.get("MEMORY3_TEST_RANDOM_EMBEDDER") == "1":
            from benchmarks.encode_job import WORDS, random_embedder

            model = random_embedder(str(tmp_path_factory.mktemp("embedder")), WORDS * 50)
        _EMBEDDER["e"] = Embedder(model)
    return _EMBEDDER["e"]


@contextlib.contextmanager
def single_thread():
    """One torch/BLAS thread while building: on a 2-core box shared with other test runs, two spinning threads
    per process make tiny models 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def build_bank(uri: str, checkpoint: Path, documents: list[dict], embedder, quantizer: str | None = None,
               shard_documents: int = 8) -> str:
    """A bank written in-process (create_bank + append_documents, which also builds the index): the serve admin
    API's path."""
    from bank.edits import append_documents
    from bank.shard_encoder import ShardEncoder

    model, tokenizer = load_checkpoint(checkpoint)
    with single_thread():
        q = None
        if quantizer:
            docs, _ = chunking.documents_from_dicts(documents)
            refs = chunking.chunk_documents(docs, tokenizer, model.cfg.reference_len)
            memories, _ = ShardEncoder(model, tokenizer, None, None, None).memories(refs)
            q = MemoryQuantizer(quantizer, model.cfg.head_dim)
            q.train(memories.view(-1, model.cfg.head_dim))
        create_bank(uri, config=model.cfg, model_sha256=weights_sha256(str(checkpoint)),
                    tokenizer_sha256=tokenizer.sha256, quantizer=q, embedder=embedder.spec(),
                    shard_documents=shard_documents)
        append_documents(uri, documents, model, tokenizer, embedder)
    return uri


def direct_memories(checkpoint: Path, records: list[dict]):
    """What the encoder computes for these references, without the bank."""
    model, tokenizer = load_checkpoint(checkpoint)
    R = model.cfg.reference_len
    tokens = torch.tensor([r["tokens"] + [tokenizer.pad_id] * (R - len(r["tokens"])) for r in records])
    with torch.no_grad(), single_thread():
        return encode_references(model, tokens, torch.tensor([len(r["tokens"]) for r in records]), tokenizer.sink_ids)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def bf16_bank(tmp_path_factory, tiny_checkpoint, embedder) -> str:
    return build_bank(str(tmp_path_factory.mktemp("bank") / "bf16"), tiny_checkpoint, make_documents(24), embedder)


def copy_bank(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_layout_rows_and_records(bf16_bank, tiny_checkpoint):
    bank = MemoryBank.open(bf16_bank, verify=True)
    cfg = ModelConfig.from_name("tiny")
    assert bank.config.memory_shape == cfg.memory_shape
    assert bank.layout.codec == "bfloat16"
    assert bank.layout.record_bytes == 8 + int(np.prod(cfg.memory_shape)) * 2
    ids = bank.reference_ids()
    assert len(ids) == len(bank) == bank.manifest["references"] > 24  # multi-chunk documents
    assert ids[0] == "city-0#0" and "city-0#1" in ids and "city-23#0" in ids
    assert all(bank.row_of(i) == row for row, i in enumerate(ids))
    for shard in bank.manifest["shards"]:  # fixed-size records: file size = rows x record size
        size = Path(bf16_bank, "shards", shard["name"] + ".mem").stat().st_size
        assert size == shard["rows"] * bank.layout.record_bytes == shard["mem_bytes"]
    rec = bank.records([bank.row_of("city-3#0")])[0]
    assert rec["doc_id"] == "city-3" and rec["text"].startswith(make_documents(1, start=3)[0]["text"][:20])
    assert rec["metadata"]["country"] in ("Peru", "Kenya", "Norway", "Japan", "Chile", "Ghana", "Laos", "Malta",
                                          "Oman", "Chad")
    with pytest.raises(KeyError, match="no reference"):
        bank.row_of("nope#0")
    with pytest.raises(IndexError, match="outside bank"):
        bank.memories([len(bank)])


def test_fetch_returns_the_encoder_output(bf16_bank, tiny_checkpoint):
    bank = MemoryBank.open(bf16_bank)
    rows = [0, 7, len(bank) - 1, 7]
    memories, n_valid = MemoryStore(bank).fetch(rows)
    assert memories.shape == (4, *bank.config.memory_shape) and memories.dtype == torch.float32
    expected = direct_memories(tiny_checkpoint, bank.records(rows))
    torch.testing.assert_close(memories, expected.memories.to(torch.bfloat16).float())  # bf16 storage, exact
    assert n_valid.tolist() == expected.n_valid.tolist()
    bf16, _ = MemoryStore(bank, dtype=torch.bfloat16).fetch(rows)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.float(), memories)


def test_quantized_bank_decodes_with_its_codebooks(tmp_path, tiny_checkpoint, embedder):
    uri = build_bank(str(tmp_path / "vq"), tiny_checkpoint, make_documents(16), embedder, quantizer="OPQ4_32,PQ4x4")
    bank = MemoryBank.open(uri, verify=True)
    assert bank.layout.codec == "faiss" and bank.manifest["quantizer"]["factory"] == "OPQ4_32,PQ4x4"
    assert bank.layout.record_bytes == 8 + bank.layout.vectors * 2  # PQ4x4: 16 bits per key/value vector
    rows = list(range(len(bank)))
    memories, n_valid = MemoryStore(bank).fetch(rows)
    direct = direct_memories(tiny_checkpoint, bank.records(rows))
    assert n_valid.tolist() == direct.n_valid.tolist()
    expected = bank.quantizer.decode(bank.quantizer.encode(direct.memories))  # what the codes must decode to
    slot_ok = torch.arange(bank.config.mem_tokens) < direct.n_valid[:, None]
    torch.testing.assert_close(memories, expected * slot_ok[:, None, None, None, :, None], atol=1e-5, rtol=1e-5)
    err = float((memories - direct.memories).norm() / direct.memories.norm())
    assert err < 0.75, err  # a real reconstruction (zeros would give 1.0), coarse at 16 bits per vector


@pytest.mark.gpu
@pytest.mark.parametrize("factory", ["OPQ8_32,Residual2x5,PQ8x6", None])
def test_gpu_store_dequantizes_on_the_gpu_from_compact_host_codes(tmp_path, tiny_checkpoint, embedder, factory):
    uri = build_bank(str(tmp_path / "bank"), tiny_checkpoint, make_documents(16), embedder, quantizer=factory)
    bank = MemoryBank.open(uri)
    rows = list(range(len(bank)))
    on_cpu, n_cpu = MemoryStore(bank).fetch(rows)
    store = MemoryStore(bank, cache_size=2, device="cuda", host_cache_size=len(rows))
    on_gpu, n_gpu = store.fetch(rows)
    assert on_gpu.device.type == "cuda" and n_gpu.tolist() == n_cpu.tolist()
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)  # torch on the GPU == FAISS on the host
    stats = store.stats()
    assert stats["host_bytes"] == len(rows) * bank.layout.payload_bytes  # the host tier holds the stored bytes
    again, _ = store.fetch(rows[:3])  # evicted from the 2-row GPU cache: host codes, decoded again on the GPU
    assert store.stats()["host_hits"] >= 1
    torch.testing.assert_close(again, on_gpu[:3], atol=1e-5, rtol=0)


def test_memory_store_lru_and_prefetch(bf16_bank):
    bank = MemoryBank.open(bf16_bank)
    store = MemoryStore(bank, cache_size=4)
    first, _ = store.fetch([0, 1, 2])
    assert store.stats()["misses"] == 3 and store.stats()["hits"] == 0
    again, _ = store.fetch([2, 0])
    assert torch.equal(again, first[[2, 0]]) and store.stats()["hits"] == 2
    store.fetch([3, 4, 5])  # 6 distinct rows through a 4-slot cache
    s = store.stats()
    assert s["cached"] == 4 and s["evictions"] == 2
    assert store.fetch([0])[0].shape[0] == 1 and store.stats()["misses"] == 6  # 0 was used last: still cached
    store.fetch([1])  # 1 was least recently used: evicted, read again
    assert store.stats()["misses"] == 7
    store.prefetch([8, 9])
    fetched, _ = store.fetch([8, 9])
    s = store.stats()
    assert s["misses"] == 7 and s["prefetched"] == 2  # served by the prefetch, not read twice
    torch.testing.assert_close(fetched, bank.memories([8, 9])[0].float())
    assert s["bytes_read"] == 9 * bank.layout.record_bytes
    store.close()


def test_verify_detects_a_flipped_byte(bf16_bank, tmp_path, capsys):
    from memory3.cli import main as cli

    assert cli(["bank", "verify", f"bank={bf16_bank}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    bank = MemoryBank.open(bf16_bank)
    assert summary["ok"] and summary["references"] == len(bank) and summary["shards"] == len(bank.shards)
    assert summary["bytes"] > sum(s["mem_bytes"] for s in bank.shards)

    broken = copy_bank(bf16_bank, tmp_path / "broken")
    shard = bank.shards[1]
    path = Path(broken, "shards", shard["name"] + ".mem")
    data = bytearray(path.read_bytes())
    row = 2
    data[row * bank.layout.record_bytes + 100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BankError, match=shard["name"]):
        MemoryBank.open(broken, verify=True)
    assert cli(["bank", "verify", f"bank={broken}"]) == 1
    out = capsys.readouterr()
    assert shard["name"] in out.err and json.loads(out.out.strip())["ok"] is False
    # the read path catches it too (per-record crc32), naming the shard; other rows still read
    store = MemoryStore(MemoryBank.open(broken))
    with pytest.raises(BankError, match=f"row {shard['row_offset'] + row} in shard {shard['name']}"):
        store.fetch([shard["row_offset"] + row])
    store.fetch([shard["row_offset"] + row + 1])


def test_truncated_or_missing_shard_names_it(bf16_bank, tmp_path):
    broken = copy_bank(bf16_bank, tmp_path / "trunc")
    shard = MemoryBank.open(broken).shards[0]
    path = Path(broken, "shards", shard["name"] + ".mem")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BankError, match=f"shard {shard['name']}.*bytes"):
        MemoryBank.open(broken).memories([0])
    path.unlink()
    with pytest.raises(BankError, match=f"shard {shard['name']}.*missing"):
        MemoryBank.open(broken, verify=True)


def test_open_refuses_other_weights_or_tokenizer(bf16_bank, tiny_checkpoint, tmp_path):
    right = weights_sha256(str(tiny_checkpoint))
    tokenizer_sha = Tokenizer.load(tiny_checkpoint).sha256
    MemoryBank.open(bf16_bank, expect_model_sha=right, expect_tokenizer_sha=tokenizer_sha)
    with pytest.raises(BankError, match="model weights sha256.*re-encode"):
        MemoryBank.open(bf16_bank, expect_model_sha="0" * 64)
    with pytest.raises(BankError, match="tokenizer sha256"):
        MemoryBank.open(bf16_bank, expect_tokenizer_sha="f" * 64)
    with pytest.raises(BankError, match="not a memory bank"):
        MemoryBank.open(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(BankError, match="corrupt"):
        MemoryBank.open(str(tmp_path))


def test_bank_on_s3_reads_records_by_range(s3_bucket, bf16_bank, tiny_checkpoint, embedder):
    uri = build_bank(f"{s3_bucket}/bank", tiny_checkpoint, make_documents(24), embedder)
    remote, local = MemoryBank.open(uri, verify=True), MemoryBank.open(bf16_bank)
    assert remote.reference_ids() == local.reference_ids()
    rows = [len(remote) - 1, 0, 1, 2, 9]  # a run of consecutive rows plus scattered ones
    a, na = MemoryStore(remote).fetch(rows)
    b, nb = MemoryStore(local).fetch(rows)
    assert torch.equal(a, b) and torch.equal(na, nb)
    # same bytes as the local bank, shard for shard
    assert [s["mem_sha256"] for s in remote.shards] == [s["mem_sha256"] for s in local.shards]
    name = remote.shards[0]["name"]
    key = f"{uri}/shards/{name}.mem"
    data = bytearray(storage.read_bytes(key))
    data[-1] ^= 0xFF
    storage.write_bytes(key, bytes(data))
    with pytest.raises(BankError, match=name):
        MemoryBank.open(uri).verify()


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_shard_encoder_copies_to_pinned_host_memory_what_the_encoder_computed(tiny_checkpoint, compile):
    """On a GPU, ShardEncoder copies each batch's memories to pinned host memory on a side stream while the next
    batch encodes: what reaches the host must be exactly what the encoder computed, batch by batch."""
    from bank.shard_encoder import ShardEncoder
    from model.encoder import pad_references

    model, tokenizer = load_checkpoint(tiny_checkpoint, "cuda", torch.bfloat16)
    docs, _ = chunking.documents_from_dicts(make_documents(40))
    refs = chunking.chunk_documents(docs, tokenizer, model.cfg.reference_len)
    encoder = ShardEncoder(model, tokenizer, None, None, None, batch_size=8, compile=compile)
    pending = encoder.device_memories(refs)  # several batches and a partial last one, all queued
    memories, n_valid = pending.host()
    assert memories.device.type == "cpu" and memories.is_pinned() and memories.dtype == torch.bfloat16
    assert pending.device_seconds() > 0
    R = model.cfg.reference_len
    for lo in range(0, len(refs), 8):  # the same fixed-size batches straight from the encoder, on one stream
        part = refs[lo:lo + 8]
        batch = part + part[:1] * (8 - len(part)) if compile else part  # as the encoder batches them
        tokens, lengths = pad_references([r.tokens for r in batch], R, tokenizer.pad_id, multiple=R)
        with torch.no_grad():  # as the encoder runs (a compiled graph differs with autograd on)
            direct = encoder.encode_fn(model, tokens.cuda(), lengths.cuda(), tokenizer.sink_ids)
        assert torch.equal(n_valid[lo:lo + len(part)], direct.n_valid[:len(part)].cpu())
        assert torch.equal(memories[lo:lo + len(part)], direct.memories[:len(part)].cpu())


@pytest.mark.gpu
def test_gpu_shard_encoder_ships_codes_quantized_on_the_gpu(tiny_checkpoint):
    """With a quantizer, a GPU encoder quantizes where it encodes and copies codes (code_size bytes a vector, not
    2 x head_dim) to the host: the records equal packing the same memories with FAISS on the host, up to the
    near-ties the GPU's GEMM may break the other way."""
    from bank.shard_encoder import ShardEncoder

    model, tokenizer = load_checkpoint(tiny_checkpoint, "cuda", torch.bfloat16)
    docs, _ = chunking.documents_from_dicts(make_documents(40))
    refs = chunking.chunk_documents(docs, tokenizer, model.cfg.reference_len)
    memories, n_valid = ShardEncoder(model, tokenizer, None, None, None, batch_size=8).memories(refs)
    q = MemoryQuantizer("OPQ8_32,Residual2x5,PQ8x6", model.cfg.head_dim)
    q.train(memories.view(-1, model.cfg.head_dim))
    layout = RecordLayout.create(model.cfg, q)
    encoder = ShardEncoder(model, tokenizer, layout, q, None, batch_size=8)
    pending = encoder.device_memories(refs)
    codes, codes_valid = pending.host()
    assert pending.codes and codes.is_pinned() and codes.dtype == torch.uint8
    assert codes.shape == (len(refs), *model.cfg.memory_shape[:-1], q.code_size)
    assert torch.equal(codes_valid, n_valid)
    expected = layout.pack(memories, n_valid, q)  # FAISS on the host, from the same memories
    records, _ = encoder.records(refs, pending, embeddings=np.zeros((len(refs), 1), dtype=np.float32))
    assert records.shape == expected.shape
    payload = slice(HEADER_BYTES, None)
    same = (records[:, payload].reshape(-1, q.code_size) == expected[:, payload].reshape(-1, q.code_size)).all(1)
    assert same.mean() > 0.999, same.mean()
    assert np.array_equal(records[:, :4], expected[:, :4])  # n_valid in each header
