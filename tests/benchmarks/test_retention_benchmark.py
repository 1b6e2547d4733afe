"""`benchmarks/retention.py`: which answer tokens the memory encoder keeps, on a checkpoint and quickstart-shaped
results. Keeping every token keeps every answer; keeping one token per KV head cannot keep a long answer."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks import retention
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.transformer import Transformer

CITIES = [  # (id, entity, facts): Aruba's country is also named inside its time zone, after the stated one
    ("1", "Oranjestad", {"country": "Aruba", "timezone": "America/Aruba"}),
    ("2", "Rosario", {"country": "Argentina", "timezone": "America/Argentina/Cordoba"}),
]


def quickstart_run(tmp_path, mem_tokens: int):
    texts = [f"{e} is a city in {f['country']}. Its time zone is {f['timezone']}." for _, e, f in CITIES]
    tokenizer = Tokenizer.train(texts * 20, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", mem_tokens=mem_tokens))
    save_checkpoint(tmp_path / "checkpoint", model, tokenizer)
    with open(tmp_path / "bank_corpus.jsonl", "w") as f:
        for (i, entity, facts), text in zip(CITIES, texts):
            f.write(json.dumps({"id": f"city:{i}", "text": text, "entity": entity, "facts": facts}) + "\n")
    results = [{"id": f"qa:{i}:{fact}", "group": "memory_only", "fact": fact, "correct": i == "1"}
               for i, _, facts in CITIES for fact in facts]
    (tmp_path / "results.json").write_text(json.dumps({"memory": results, "none": [], "rag": []}))
    return tokenizer, texts


def run_bench(monkeypatch, capsys, tmp_path) -> list[dict]:
    argv = ["retention", "--run", str(tmp_path), "--facts", "country", "timezone"]
    monkeypatch.setattr(sys, "argv", argv)
    retention.main()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_the_stated_fact_is_the_span(tmp_path):
    tokenizer, texts = quickstart_run(tmp_path, mem_tokens=16)
    ids, span = retention.answer_span(tokenizer, texts[0], "Oranjestad", "Aruba")
    assert ids == tokenizer.encode(texts[0])
    assert tokenizer.decode([ids[i] for i in span]).strip() == "Aruba"
    assert span[-1] < len(tokenizer.encode(texts[0].split(". Its")[0]))  # the country sentence, not the zone


@pytest.mark.parametrize("mem_tokens", [64, 1])
def test_retention_per_fact_layer_and_outcome(monkeypatch, capsys, tmp_path, mem_tokens):
    quickstart_run(tmp_path, mem_tokens)
    rows = run_bench(monkeypatch, capsys, tmp_path)
    cfg = ModelConfig.from_name("tiny")
    assert {(r["fact"], r["layer"], r["correct"]) for r in rows} == {
        (fact, layer, correct) for fact in ("country", "timezone") for layer in range(cfg.n_mem_layer)
        for correct in (True, False)}
    assert all(r["questions"] == 1 and r["mem_tokens"] == mem_tokens for r in rows)
    zones = [r for r in rows if r["fact"] == "timezone"]
    if mem_tokens == 64:  # k above the reference's length: nothing is dropped
        assert all(r["answer_fully_kept"] == 1 and r["answer_tokens_kept"] == 1 for r in rows)
    else:  # one token per KV head: at most n_kv_head of a zone's several tokens
        assert all(r["answer_fully_kept"] == 0 and r["answer_tokens_kept"] < 1 for r in zones)
