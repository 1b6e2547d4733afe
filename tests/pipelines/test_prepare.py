"""`memory3 prepare`: tokenizer training, packing, malformed records, Parquet in/out, S3 out."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bank import storage
from configs import load_config
from model.tokenizer import Tokenizer
from pipelines.prepare import MANIFEST, decode_text, pack_sequences, prepare

SEQ_LEN = 48
DOCS = [{"id": f"doc{i}", "text": f"Document {i} says that the city number {i} lies near river {i % 7}. " * (1 + i % 4),
         "source_id": f"src{i % 5}" if i % 3 else None} for i in range(60)]
BAD_LINES = ["{not json", '{"id": "x"}', "[1, 2]", '{"id": "e", "text": "   "}', '{"text": "no id"}']


def cfg_for(**overrides):
    return load_config("prepare", [f"{k}={v}" for k, v in overrides.items()])


def read_rows(out: str, manifest: dict) -> list[dict]:
    fs, path = storage.filesystem(storage.join(out, manifest["data_dir"]))
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    return pa.concat_tables(tables).to_pylist()


def test_pack_sequences_cuts_long_documents_and_starts_every_sequence_with_the_sink():
    sink, bos = [2, 4], 2
    docs = [(list(range(10, 40)), "a"), (list(range(50, 55)), "b"), (list(range(60, 62)), "c")]
    packed = pack_sequences(docs, sink, bos, 16, pack=True)
    assert all(seq[:3] == [2, 4, 2] and len(seq) <= 16 for seq, _ in packed)
    stream = [t for seq, _ in packed for t in seq[2:] if t != bos]  # all document tokens, in order, none lost
    assert stream == [t for ids, _ in docs for t in ids]
    assert [src for _, src in packed] == [["a"], ["a"], ["a", "b", "c"]]  # a continues, b and c share the tail
    single = pack_sequences(docs, sink, bos, 16, pack=False)
    assert all(len(src) == 1 for _, src in single)  # one document per sequence
    assert [s for s, _ in single if s[3] == 50] == [[2, 4, 2, 50, 51, 52, 53, 54]]


def test_prepare_jsonl_trains_tokenizer_packs_and_counts_malformed(tmp_path, ray_local):
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps(d) for d in DOCS[:30]] + BAD_LINES + [json.dumps(d) for d in DOCS[30:]]
    corpus.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "prepared")
    manifest = prepare(cfg_for(corpus=corpus, out=out, vocab_size=300, **{"model.max_seq_len": SEQ_LEN}))

    assert manifest["documents"] == len(DOCS)
    assert manifest["malformed_total"] == len(BAD_LINES)
    assert manifest["malformed"] == {"invalid JSON": 1, "missing 'text'": 1, "record is a list, not an object": 1,
                                     "empty 'text'": 1, "missing 'id'": 1}
    tk = Tokenizer.load(f"{out}/tokenizer.json")
    assert tk.vocab_size == 300 and tk.sha256 == manifest["tokenizer_sha256"]
    rows = read_rows(out, manifest)
    assert len(rows) == manifest["sequences"] and sum(len(r["tokens"]) for r in rows) == manifest["tokens"]
    assert all(r["tokens"][:3] == tk.context_ids("")[:3] and len(r["tokens"]) <= SEQ_LEN for r in rows)
    # Every document's tokens survive packing in order; sources are the record's source_id, else its id.
    stream = [t for r in rows for t in r["tokens"][2:]]
    assert stream[0] == tk.bos_id
    for doc in DOCS:
        assert tk.decode(tk.encode(doc["text"])) in decode_text(tk, stream).replace("\n", "")
    sources = {s for r in rows for s in r["source_ids"]}
    assert sources == {d["source_id"] or d["id"] for d in DOCS}
    assert rows[0]["text"] == decode_text(tk, rows[0]["tokens"])


def test_prepare_parquet_with_given_tokenizer_unpacked_to_s3(tmp_path, ray_local, s3_bucket):
    tk = Tokenizer.train([d["text"] for d in DOCS], 280)
    tk.save(tmp_path / "tokenizer.json")
    src = tmp_path / "corpus"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(DOCS[:40]), src / "a.parquet")
    pq.write_table(pa.Table.from_pylist(DOCS[40:]), src / "b.parquet")
    out = f"{s3_bucket}/prepared"
    manifest = prepare(cfg_for(corpus=src, out=out, tokenizer=tmp_path / "tokenizer.json", pack="false",
                               **{"model.max_seq_len": SEQ_LEN}))
    assert manifest["tokenizer_sha256"] == tk.sha256
    assert json.loads(storage.read_text(f"{out}/{MANIFEST}")) == manifest
    assert Tokenizer.from_str(storage.read_text(f"{out}/tokenizer.json")).sha256 == tk.sha256
    rows = read_rows(out, manifest)
    assert all(len(r["source_ids"]) == 1 for r in rows)  # one document per sequence
    expected = {d["id"]: tk.context_ids(d["text"]) + [tk.eos_id] for d in DOCS}  # each document ends with </s>
    short = [d for d in DOCS if len(expected[d["id"]]) <= SEQ_LEN]
    got = {tuple(r["tokens"]) for r in rows}
    assert all(tuple(expected[d["id"]]) in got for d in short)
    assert manifest["malformed_total"] == 0 and manifest["documents"] == len(DOCS)


def test_prepare_rejects_a_corpus_without_valid_documents(tmp_path, ray_local):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("\n".join(BAD_LINES) + "\n")
    tk = Tokenizer.train([d["text"] for d in DOCS], 280)
    tk.save(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="no valid documents"):
        prepare(cfg_for(corpus=corpus, out=tmp_path / "out", tokenizer=tmp_path / "tokenizer.json"))
    with pytest.raises(FileNotFoundError):
        prepare(cfg_for(corpus=tmp_path / "missing.jsonl", out=tmp_path / "out"))


def test_prompt_records_get_their_own_sequence_a_loss_start_and_a_query(tmp_path, ray_local):
    """A record with `prompt` (a prefix of its text) is never packed with others; its loss starts at the answer
    and the continual stage retrieves with the prompt. A prompt that is not a prefix is counted as malformed."""
    from pipelines.train_loop import IGNORE, collate

    asked = [{"id": f"q{i}", "text": f"Question: where is city {i}? Answer: river {i % 7}",
              "prompt": f"Question: where is city {i}? Answer:"} for i in range(12)]
    bad = {"id": "bad", "text": "Question: x? Answer: y", "prompt": "Question: z?"}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS[:20] + asked + [bad]))
    out = str(tmp_path / "prepared")
    manifest = prepare(cfg_for(corpus=corpus, out=out, vocab_size=300, **{"model.max_seq_len": SEQ_LEN}))
    assert manifest["malformed"] == {"'prompt' is not a proper prefix of 'text'": 1}
    tk = Tokenizer.load(f"{out}/tokenizer.json")
    rows = read_rows(out, manifest)
    prompted = [r for r in rows if r["query"]]
    assert sorted(r["query"] for r in prompted) == sorted(d["prompt"] for d in asked)
    for r in prompted:
        assert r["source_ids"] == [next(d["id"] for d in asked if d["prompt"] == r["query"])]  # alone
        answer = tk.decode(r["tokens"][r["loss_start"]:]).strip()
        assert answer == next(d["text"] for d in asked if d["prompt"] == r["query"])[len(r["query"]):].strip()
    assert all(r["loss_start"] == 0 for r in rows if not r["query"])
    batch = collate({"tokens": [prompted[0]["tokens"]], "loss_start": [prompted[0]["loss_start"]]}, SEQ_LEN,
                    pad_id=tk.pad_id, sink_len=2)
    targets = batch.targets[0].tolist()
    first = prompted[0]["loss_start"] - 1  # target j is token j + 1: the first answer token
    assert all(t == IGNORE for t in targets[:first]) and targets[first] == prompted[0]["tokens"][first + 1]
