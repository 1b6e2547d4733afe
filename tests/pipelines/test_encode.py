"""`memory3 encode` on real local Ray Data (pipelines/encode.py): errors, resume, append, S3, and faults.

One corpus and config serve as the reference run (`reference_bank`, two encoder actors); the resume and fault
tests (one actor, other schedules, interruptions) must end with exactly its bytes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from bank import storage
from bank.format import BankError
from bank.index import Retriever
from bank.reader import MemoryBank
from bank.store import MemoryStore
from model.checkpoint import load_checkpoint, save_checkpoint
from model.transformer import Transformer
from pipelines.encode import encode_corpus
from test_bank import _one_thread, direct_memories, embedder, make_documents, tiny_checkpoint  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
QUANTIZER = "OPQ4_32,PQ4x4"  # small codebooks: trains in seconds on 2 cores
BAD_LINES = [
    b'{"id": "nt"}\n',                          # no text
    b'{"id": "wt", "text": 5}\n',               # wrong type
    b'\xff\xfe\n',                               # invalid UTF-8
    b'not json at all\n',                        # not JSON
    b'{"id": "ok-in-bad", "text": "Quorvale is a village in Malta. It has a population of 812 people."}\n',
    b'{"id": "", "text": "no id"}\n',           # empty id
]
N_BAD = 5 + 1  # the bad lines above plus the empty file


def encode_config(corpus: str, bank: str, checkpoint: Path, **overrides):
    cfg = OmegaConf.load(REPO / "configs" / "encode.yaml")
    cfg.corpus, cfg.bank, cfg.checkpoint = corpus, bank, str(checkpoint)
    cfg.shard_documents, cfg.quantizer, cfg.quantizer_sample = 3, QUANTIZER, 48
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def write_corpus(folder: Path, documents: list[dict]) -> Path:
    """good.jsonl + more.parquet (the documents), bad.jsonl (malformed lines, one good), empty.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    split = len(documents) * 5 // 6
    (folder / "good.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents[:split]))
    rest = documents[split:]
    pq.write_table(pa.table({"id": [d["id"] for d in rest], "text": [d["text"] for d in rest],
                             "country": [d["country"] for d in rest]}), folder / "more.parquet")
    (folder / "bad.jsonl").write_bytes(b"".join(BAD_LINES))
    (folder / "empty.jsonl").write_bytes(b"")
    return folder


def bank_files(bank: str | Path) -> dict[str, bytes]:
    root = Path(bank)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_bank(a: str | Path, b: str | Path) -> None:
    fa, fb = bank_files(a), bank_files(b)
    assert sorted(fa) == sorted(fb)
    different = [name for name in fa if fa[name] != fb[name]]
    assert not different, f"files differ: {different}"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs", make_documents(48))


@pytest.fixture(scope="module")
def reference_bank(ray_local, tmp_path_factory, corpus_dir, tiny_checkpoint):
    bank = str(tmp_path_factory.mktemp("ref") / "bank")
    summary = encode_corpus(encode_config(str(corpus_dir), bank, tiny_checkpoint))
    return bank, summary


def test_encode_writes_a_verified_bank_and_reports_bad_records(reference_bank, corpus_dir):
    bank_uri, summary = reference_bank
    bank = MemoryBank.open(bank_uri, verify=True)
    assert summary["documents"] == 49 == bank.manifest["documents"]  # 48 + the good line of bad.jsonl
    assert summary["references"] == len(bank) == summary["encoded_references"]
    assert summary["errors"] == N_BAD and bank.manifest["errors"] == N_BAD
    assert summary["codec"] == "faiss" and summary["index"]["rows"] == len(bank)
    errors = [json.loads(line) for line in Path(bank_uri, "errors.jsonl").read_text().splitlines()]
    assert len(errors) == N_BAD
    by_file = {(Path(e["file"]).name, e.get("line", e.get("row"))): e["reason"] for e in errors}
    assert by_file[("bad.jsonl", 1)] == "missing 'text'"
    assert "must be a string" in by_file[("bad.jsonl", 2)]
    assert "invalid UTF-8" in by_file[("bad.jsonl", 3)]
    assert "not JSON" in by_file[("bad.jsonl", 4)]
    assert by_file[("bad.jsonl", 6)] == "empty 'id'"
    assert by_file[("empty.jsonl", 0)] == "empty file"
    # shards follow corpus file order; ids are "<doc_id>#<chunk>" with the source doc_id kept
    ids = bank.reference_ids()
    assert ids[0] == "ok-in-bad#0" and ids[1] == "city-0#0" and "city-0#1" in ids
    assert [s["name"].split("-")[0] for s in bank.shards] == ["bad"] + ["good"] * 14 + ["more"] * 3
    rec = bank.records([bank.row_of("city-45#0")])[0]
    assert rec["doc_id"] == "city-45" and rec["metadata"] == {"country": make_documents(48)[45]["country"]}
    # rates once start-up is paid: each actor's (its gauge's figure) over its own parts, the pool's stream
    actors = summary["actors"]
    assert sum(a["references"] for a in actors.values()) == len(bank)
    assert all(0 < a["references_per_second"] <= a["encoder_references_per_second"] for a in actors.values())
    assert summary["stream_references_per_second"] > 0


def test_compile_is_auto_on_cuda_only():
    from pipelines.encode import compile_encoder

    assert compile_encoder("auto", "cuda") and compile_encoder("auto", "cuda:1") and not compile_encoder("auto", "cpu")
    assert compile_encoder(True, "cpu") and not compile_encoder(False, "cuda")
    with pytest.raises(ValueError, match="compile"):
        compile_encoder("yes", "cpu")


def test_an_unknown_quantizer_kernel_fails_before_any_work_with_the_choices(tmp_path):
    cfg = encode_config(str(tmp_path / "none.jsonl"), str(tmp_path / "bank"), tmp_path, quantizer_kernel="tf16")
    with pytest.raises(ValueError, match=r"quantizer_kernel='tf16' must be one of tf32x3, ieee, tf32, e\.g\. "):
        encode_corpus(cfg)
    assert not (tmp_path / "bank").exists()


def test_encoded_memories_are_the_models(reference_bank, tiny_checkpoint):
    bank = MemoryBank.open(reference_bank[0])
    rows = list(range(0, len(bank), 7))
    memories, n_valid = MemoryStore(bank).fetch(rows)
    direct = direct_memories(tiny_checkpoint, bank.records(rows))
    assert n_valid.tolist() == direct.n_valid.tolist()
    slot_ok = torch.arange(bank.config.mem_tokens) < direct.n_valid[:, None]
    expected = bank.quantizer.decode(bank.quantizer.encode(direct.memories)) * slot_ok[:, None, None, None, :, None]
    torch.testing.assert_close(memories, expected, atol=1e-4, rtol=1e-4)


def test_retrieval_on_the_encoded_bank(reference_bank, embedder):
    bank = MemoryBank.open(reference_bank[0])
    retriever = Retriever.open(reference_bank[0], embedder)
    docs = make_documents(48)
    queries = [re.split(r"(?<=\.) ", d["text"])[0] for d in docs[::4]]
    top = retriever.search(queries, k=1)
    hits = sum(bank.doc_ids()[t[0]] == d["id"] for t, d in zip(top, docs[::4]))
    assert hits >= len(queries) - 1, (hits, len(queries))


def test_metric_names_follow_the_contract():
    source = (REPO / "pipelines" / "encode.py").read_text()
    for name in ("memory3_encode_references_total", "memory3_encode_tokens_total",
                 "memory3_encode_bytes_written_total", "memory3_encode_errors_total",
                 "memory3_encode_references_per_second"):
        assert f'"{name}"' in source


def test_appending_documents_encodes_only_the_new_ones(reference_bank, corpus_dir, tiny_checkpoint, tmp_path,
                                                       embedder):
    bank_uri, _ = reference_bank
    bank = shutil.copytree(bank_uri, tmp_path / "bank")
    corpus = shutil.copytree(corpus_dir, tmp_path / "corpus")
    old = bank_files(bank)
    n_old = len(MemoryBank.open(str(bank)))
    new_docs = make_documents(4, start=100) + [make_documents(1, start=5)[0]]  # one id already in the bank
    (corpus / "zz-new.jsonl").write_text("".join(json.dumps(d) + "\n" for d in new_docs))
    summary = encode_corpus(encode_config(str(corpus), str(bank), tiny_checkpoint, actors=1))
    assert summary["written_shards"] == 2 and summary["skipped_shards"] == 18
    after = bank_files(bank)
    for name, data in old.items():
        if name.startswith("shards/"):
            assert after[name] == data, name  # old shards untouched
    reopened = MemoryBank.open(str(bank), verify=True)
    assert reopened.reference_ids()[:n_old] == MemoryBank.open(bank_uri).reference_ids()
    dup_rows = [r for r in range(n_old, len(reopened)) if reopened.doc_ids()[r] == "city-5"]
    assert dup_rows and all(reopened.is_deleted(r) for r in dup_rows)
    assert any("duplicate document id 'city-5'" in line for line in (bank / "errors.jsonl").read_text().splitlines())
    retriever = Retriever.open(str(bank), embedder)
    assert retriever.index.ntotal == reopened.manifest["live_references"]
    [top] = retriever.search([re.split(r"(?<=\.) ", new_docs[2]["text"])[0]], k=1)
    assert reopened.doc_ids()[top[0]] == "city-102"


def test_other_weights_are_refused_before_any_work(reference_bank, corpus_dir, tiny_checkpoint, tmp_path):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other", Transformer(model.cfg), tokenizer)
    before = bank_files(reference_bank[0])
    with pytest.raises(BankError, match="model weights sha256"):
        encode_corpus(encode_config(str(corpus_dir), reference_bank[0], other))
    with pytest.raises(BankError, match="quantizer"):
        encode_corpus(encode_config(str(corpus_dir), reference_bank[0], tiny_checkpoint, quantizer=None))
    assert bank_files(reference_bank[0]) == before


def test_s3_corpus_to_s3_bank(ray_local, s3_bucket, tiny_checkpoint, tmp_path, embedder):
    local = write_corpus(tmp_path / "docs", make_documents(12, start=300))
    for f in local.iterdir():
        storage.write_bytes(f"{s3_bucket}/corpus/{f.name}", f.read_bytes())
    bank_uri = f"{s3_bucket}/bank"
    summary = encode_corpus(encode_config(f"{s3_bucket}/corpus", bank_uri, tiny_checkpoint, quantizer=None,
                                          shard_documents=4, actors=1))
    assert summary["documents"] == 13 and summary["errors"] == N_BAD and summary["codec"] == "bfloat16"
    bank = MemoryBank.open(bank_uri, verify=True)
    errors = storage.read_text(f"{bank_uri}/errors.jsonl").splitlines()
    assert len(errors) == N_BAD and all(json.loads(e)["file"].startswith(s3_bucket) for e in errors)
    rows = [len(bank) - 1, 0, 3]
    memories, n_valid = MemoryStore(bank).fetch(rows)  # ranged reads from S3
    direct = direct_memories(tiny_checkpoint, bank.records(rows))
    torch.testing.assert_close(memories, direct.memories.to(torch.bfloat16).float())
    retriever = Retriever.open(bank_uri, embedder)
    doc = make_documents(1, start=307)[0]
    [top] = retriever.search([re.split(r"(?<=\.) ", doc["text"])[0]], k=1)
    assert bank.doc_ids()[top[0]] == doc["id"]


# --- faults ----------------------------------------------------------------------------------------------------

def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def settled(measure, quiet: float, timeout: float):
    """measure() once it has not changed for `quiet` seconds."""
    deadline, value, since = time.monotonic() + timeout, measure(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = measure()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    raise AssertionError(f"still changing after {timeout}s")


def markers(bank: Path) -> list[Path]:
    return list((bank / "shards").glob("*.json")) if (bank / "shards").is_dir() else []


def encoder_actors() -> list[dict]:
    from ray._private import state  # GCS actor table: works without the dashboard

    return [a for a in state.actors().values() if "EncodeShards" in a["ActorClassName"]]


def test_killing_an_encoder_actor_mid_job_changes_no_byte(reference_bank, corpus_dir, tiny_checkpoint, tmp_path):
    bank = tmp_path / "bank"
    known = {a["ActorID"] for a in encoder_actors()}
    result: dict = {}

    def run():
        try:
            result["summary"] = encode_corpus(encode_config(str(corpus_dir), str(bank), tiny_checkpoint, actors=1))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    job = threading.Thread(target=run)
    job.start()
    try:
        wait_for(lambda: markers(bank), 240, "the first shard")
        victims = wait_for(lambda: [a for a in encoder_actors() if a["ActorID"] not in known and
                                    a["State"] == "ALIVE" and a["Pid"]], 30, "a live encoder actor")
        done_at_kill = len(markers(bank))
        os.kill(victims[0]["Pid"], signal.SIGKILL)
    finally:
        job.join(timeout=300)
    assert "summary" in result, f"the job did not finish after an actor was killed: {result.get('error')!r}"
    assert done_at_kill < 18, "the job finished before the kill; the test proved nothing"
    restarted = [a for a in encoder_actors() if a["ActorID"] == victims[0]["ActorID"]]
    assert restarted and restarted[0]["NumRestarts"] >= 1
    assert_same_bank(reference_bank[0], bank)


def test_killing_the_driver_then_rerunning_changes_no_byte(reference_bank, corpus_dir, tiny_checkpoint, tmp_path):
    bank = tmp_path / "bank"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "memory3.cli", "encode", f"corpus={corpus_dir}", f"bank={bank}",
           f"checkpoint={tiny_checkpoint}", "ray_address=local", "shard_documents=3", f"quantizer={QUANTIZER}",
           "quantizer_sample=48", "actors=1"]
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: markers(bank) or driver.poll() is not None, 300, "the first shard of the subprocess job")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        try:  # the local Ray the driver started: same process group, started by this test
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    # a worker of the killed job may still commit the shard it was writing before it sees its raylet gone
    killed_with = settled(lambda: len(markers(bank)), quiet=5.0, timeout=60)
    assert killed_with < 18, "the job finished before the kill; the test proved nothing"
    # Harder still: as if the kill came before the bank was created (no manifest, no codebooks: they must be
    # retrained to the same bytes, or the surviving shards' codes would not decode) and mid-way through writing a
    # shard (records written, commit marker not).
    for name in ("manifest.json", "quantizer.faiss"):
        (bank / name).unlink()
    sorted(markers(bank))[0].unlink()
    complete = len(markers(bank))
    summary = encode_corpus(encode_config(str(corpus_dir), str(bank), tiny_checkpoint, actors=1))
    assert summary["skipped_shards"] == complete and summary["written_shards"] == 18 - complete
    assert_same_bank(reference_bank[0], bank)


def test_compiled_encoder_matches_eager_with_a_padded_last_batch(tiny_checkpoint):
    """compile=true pads every batch to batch_size (one graph, no recompiles); the padding rows must not leak."""
    from bank import chunking
    from bank.shard_encoder import ShardEncoder

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    docs = [chunking.Document(d["id"], d["text"], {}) for d in make_documents(7)]
    refs = chunking.chunk_documents(docs, tokenizer, model.cfg.reference_len)
    assert len(refs) % 4 != 0  # a short last batch
    eager, eager_valid = ShardEncoder(model, tokenizer, None, None, None, batch_size=4).memories(refs)
    compiled, compiled_valid = ShardEncoder(model, tokenizer, None, None, None, batch_size=4, compile=True).memories(refs)
    assert compiled.shape == eager.shape and torch.equal(compiled_valid, eager_valid)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_overlapped_writes_change_no_byte(reference_bank, corpus_dir, tiny_checkpoint, tmp_path):
    """The reference bank was written with overlap_writes on (the default): serially, every byte is the same."""
    bank = str(tmp_path / "serial")
    encode_corpus(encode_config(str(corpus_dir), bank, tiny_checkpoint, actors=1, overlap_writes=False))
    assert_same_bank(reference_bank[0], bank)


def test_an_encoder_actor_encodes_the_next_part_while_it_writes(reference_bank, tiny_checkpoint, monkeypatch):
    """Two calls at once (as Ray Data makes them with overlap_writes): part 2 encodes while part 1 is written,
    and never two parts on the device or two being written at the same time."""
    import pipelines.encode as encode
    from bank.chunking import chunk_documents, documents_from_dicts, reference_to_dict

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    events, lock = [], threading.Lock()

    def log(what):
        with lock:
            events.append(what)

    def slow_write(bank_uri, name, refs, records, embeddings):
        log(f"write {name} start")
        time.sleep(1.0)
        log(f"write {name} end")
        return {"rows": len(refs), "tokens": 1, "mem_bytes": 1, "meta_bytes": 1}

    monkeypatch.setattr(encode, "write_shard", slow_write)
    actor = encode.EncodeShards(str(tiny_checkpoint), reference_bank[0], None, 4, "cpu", "float32", 1, 8)
    device_memories = actor.encoder.device_memories

    def logged_encode(refs):
        log(f"encode {refs[0].doc_id} start")
        out = device_memories(refs)
        log(f"encode {refs[0].doc_id} end")
        return out

    actor.encoder.device_memories = logged_encode

    def part(i: int) -> dict:
        docs, _ = documents_from_dicts(make_documents(3, start=10 * i))
        refs = [reference_to_dict(r) for r in chunk_documents(docs, tokenizer, model.cfg.reference_len)]
        return {"file_index": [0], "part": [i], "source": ["s"], "name": [f"p{i}"],
                "payload": [json.dumps({"references": refs, "errors": []})]}

    first = threading.Thread(target=actor, args=(part(1),))
    first.start()
    while "write p1 start" not in events:
        time.sleep(0.01)
    out = actor(part(2))
    first.join()
    assert out["status"] == ["written"]
    assert events.index("encode city-20 end") < events.index("write p1 end"), events  # overlapped
    assert events.index("write p1 end") < events.index("write p2 start"), events  # one write at a time


def test_reencoding_reuses_the_embeddings_of_the_same_texts(reference_bank, corpus_dir, tiny_checkpoint, tmp_path):
    """embeddings_from: memories are computed again, embeddings come from the other bank (they depend only on the
    text). The source bank's embeddings are negated first, so only reuse can put them in the new bank."""
    import numpy as np

    source = tmp_path / "source"
    shutil.copytree(reference_bank[0], source)
    for path in (source / "shards").glob("*.parquet"):
        table = pq.read_table(path)
        emb = -np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
        pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", column), path)
    bank = str(tmp_path / "again")
    encode_corpus(encode_config(str(corpus_dir), bank, tiny_checkpoint, embeddings_from=str(source)))
    new, ref = bank_files(bank), bank_files(reference_bank[0])
    mem = [n for n in ref if n.endswith(".mem")]
    assert mem and all(new[n] == ref[n] for n in mem)  # the memories are this checkpoint's, as before
    for name in (n for n in ref if n.endswith(".parquet")):
        got = pq.read_table(Path(bank) / name).column("embedding").to_pylist()
        want = pq.read_table(source / name).column("embedding").to_pylist()
        assert np.allclose(got, want) and not np.allclose(got, pq.read_table(
            Path(reference_bank[0]) / name).column("embedding").to_pylist())


def test_embeddings_from_another_embedder_are_refused(reference_bank, corpus_dir, tiny_checkpoint, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(reference_bank[0], source)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["embedder"]["model"] = "some-other-embedder"
    (source / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cannot be reused"):
        encode_corpus(encode_config(str(corpus_dir), str(tmp_path / "b"), tiny_checkpoint,
                                    embeddings_from=str(source)))
