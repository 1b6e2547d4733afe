"""Corpus reading, validation and chunking (bank/chunking.py): no Ray, no model."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bank import chunking, storage
from model.tokenizer import Tokenizer

TEXTS = [
    "Velmora is a city in Peru. It lies on the Rimac river and has a population of 81234 people. "
    "Its old market sells textiles, and its cathedral dates from 1702. Winters are dry and mild.",
    "Oskarby is a town in Sweden. It has a population of 4021 people. The town has a ferry to the islands.",
    "Tiny.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS * 10 + ["naïve café 東京 — über"], 400)


def write_jsonl(path, lines: list) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return str(path)


def test_jsonl_validation_counts_every_malformed_record(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [
        {"id": "a", "text": TEXTS[0], "country": "Peru"},
        {"id": "b"},                                   # 2: no text
        {"id": "c", "text": 42},                       # 3: text of the wrong type
        {"id": ["d"], "text": "x"},                    # 4: id of the wrong type
        b"\xff\xfe not utf-8\n",                       # 5: invalid UTF-8
        b"{not json\n",                                # 6: not JSON
        b"\n",                                         # 7: blank: skipped silently
        {"id": "e", "text": "   "},                    # 8: empty text
        [1, 2],                                        # 9: not an object
        {"id": "a", "text": "again"},                  # 10: duplicate id
        {"id": 7, "text": TEXTS[1]},                   # 11: integer id is fine
    ])
    items = list(chunking.iter_file(path))
    docs = [i for i in items if isinstance(i, chunking.Document)]
    errors = [i for i in items if isinstance(i, dict)]
    assert [d.id for d in docs] == ["a", "7"]
    assert docs[0].metadata == {"country": "Peru"}
    assert [e["line"] for e in errors] == [2, 3, 4, 5, 6, 8, 9, 10]
    reasons = " | ".join(e["reason"] for e in errors)
    for expected in ("missing 'text'", "'text' must be a string", "'id' must be", "invalid UTF-8", "not JSON",
                     "empty 'text'", "not an object", "duplicate document id"):
        assert expected in reasons
    assert all(e["file"] == path for e in errors)


def test_empty_and_unreadable_files_are_reported_not_raised(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert list(chunking.iter_file(empty)) == [{"file": empty, "line": 0, "reason": "empty file"}]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    (err,) = list(chunking.iter_file(str(broken)))
    assert err["row"] == 0 and "cannot read Parquet" in err["reason"]
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"id": ["x"], "body": ["y"]}), nocol)
    (err,) = list(chunking.iter_file(str(nocol)))
    assert "missing column" in err["reason"] and "text" in err["reason"]
    # a file of only errors still yields one Part, so the job reports its errors
    (part,) = list(chunking.iter_parts(empty, 0, 4))
    assert part.documents == [] and len(part.errors) == 1


def test_parquet_and_gzip_read_like_jsonl(tmp_path):
    pq.write_table(pa.table({"id": ["p1", "p2", None], "text": [TEXTS[0], TEXTS[1], "orphan"],
                             "lang": ["en", "sv", "en"]}), tmp_path / "docs.parquet")
    items = list(chunking.iter_file(str(tmp_path / "docs.parquet")))
    assert [i.id for i in items if isinstance(i, chunking.Document)] == ["p1", "p2"]
    assert items[0].metadata == {"lang": "en"}
    assert items[2] == {"file": str(tmp_path / "docs.parquet"), "row": 2, "reason": "missing 'id'"}
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "g", "text": TEXTS[2]}) + "\n")
    assert [d.id for d in chunking.iter_file(str(tmp_path / "z.jsonl.gz"))] == ["g"]
    files = chunking.list_corpus_files(str(tmp_path))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["docs.parquet", "z.jsonl.gz"]


def test_listing_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chunking.list_corpus_files(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no JSONL or Parquet"):
        chunking.list_corpus_files(str(tmp_path))
    (tmp_path / "x.csv").write_text("id,text\n")
    with pytest.raises(ValueError, match="neither JSONL"):
        chunking.list_corpus_files(str(tmp_path / "x.csv"))


def test_chunks_are_bounded_stable_and_cover_the_text(tokenizer):
    long_doc = chunking.Document("doc/1", " ".join(TEXTS[:2]) * 3 + " naïve café 東京 — über", {"k": 1})
    refs = chunking.chunk_document(long_doc, tokenizer, reference_len=24)
    assert len(refs) > 3
    assert [r.id for r in refs] == [f"doc/1#{i}" for i in range(len(refs))]
    assert all(r.doc_id == "doc/1" and r.metadata == {"k": 1} for r in refs)
    assert all(0 < len(r.tokens) <= 24 for r in refs)
    assert sum((r.tokens for r in refs), []) == tokenizer.encode(long_doc.text.strip())  # no token lost or repeated
    # the chunk text is the text of its tokens
    for r in refs:
        assert tokenizer.decode(r.tokens).strip() == r.text
    # cuts prefer sentence ends: most chunks end with a full stop
    assert sum(r.text.endswith(".") for r in refs[:-1]) >= len(refs[:-1]) // 2
    again = chunking.chunk_document(long_doc, tokenizer, reference_len=24)
    assert [(r.id, r.tokens, r.text) for r in again] == [(r.id, r.tokens, r.text) for r in refs]


def test_parts_are_deterministic_and_content_addressed(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"Document number {i}."} for i in range(10)]
                       + [{"id": "bad"}])
    parts = list(chunking.iter_parts(path, 3, shard_documents=4))
    assert [len(p.documents) for p in parts] == [4, 4, 2]
    assert [p.index for p in parts] == [0, 1, 2] and all(p.file_index == 3 for p in parts)
    assert parts[-1].errors and parts[-1].errors[0]["reason"] == "missing 'text'"
    names = [p.shard_name for p in parts]
    assert names == [p.shard_name for p in chunking.iter_parts(path, 3, 4)]
    assert names[0].startswith("docs-00000-") and len(set(names)) == 3
    # changing one document changes that part's name only
    lines = open(path).read().splitlines()
    lines[5] = json.dumps({"id": "d5", "text": "Changed."})
    write_jsonl(tmp_path / "docs.jsonl", [json.loads(x) for x in lines])
    changed = [p.shard_name for p in chunking.iter_parts(path, 3, 4)]
    assert changed[0] == names[0] and changed[1] != names[1] and changed[2] == names[2]


def test_documents_from_dicts_validates_api_input():
    docs, errors = chunking.documents_from_dicts([{"id": "x", "text": "ok"}, {"id": "y", "text": None},
                                                {"id": "x", "text": "dup"}])
    assert [d.id for d in docs] == ["x"]
    assert [(e["row"], e["reason"]) for e in errors] == [(1, "missing 'text'"), (2, "duplicate document id 'x'")]


def test_reads_corpus_from_s3(s3_bucket, tmp_path):
    local = write_jsonl(tmp_path / "docs.jsonl", [{"id": "s1", "text": TEXTS[0]}, b"oops\n"])
    storage.write_bytes(f"{s3_bucket}/corpus/docs.jsonl", open(local, "rb").read())
    files = chunking.list_corpus_files(f"{s3_bucket}/corpus")
    assert files == [f"{s3_bucket}/corpus/docs.jsonl"]
    items = list(chunking.iter_file(files[0]))
    assert items[0].id == "s1" and items[1]["line"] == 2 and items[1]["file"] == files[0]
