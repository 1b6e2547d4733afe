"""benchmarks/reading.py end to end at a tiny size: prep (corpus, tokenizer, retrieval with the bundled
embedder) then both training stages and the evaluation, one JSON line with every figure."""
from __future__ import annotations

import json

from benchmarks import reading


def test_prep_then_run_reports_every_fact_mode_and_diagnostic(tmp_path, capsys):
    reading.prep({"out": str(tmp_path), "corpus.n_trained": 60, "corpus.n_reading": 60, "corpus.n_continual": 60,
                  "corpus.n_memory_only": 20, "corpus.n_counterfactual": 5, "corpus.layout": "fixed"})
    prepared = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert prepared["qa"] > 0 and prepared["refs"] > 0 and (tmp_path / "data.json.gz").is_file()
    reading.run({"data": str(tmp_path), "warmup_steps": 4, "continual_steps": 3, "limit": 5, "tag": "smoke"})
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["tag"] == "smoke" and len(row["warmup_loss"]) == 2 and len(row["continual_loss"]) == 2
    for fact in ("country", "continent", "timezone", "population"):
        for mode in ("memory", "none", "rag"):
            assert 0.0 <= row[f"memory_only/{fact}/{mode}"] <= 1.0
    assert row["diag/country/right_retrieved"] > 0.5  # exact search over the bundled embedder finds most
    assert 0.0 <= row["counterfactual/followed"] <= 1.0 and len(row["diag/samples"]) == 5
