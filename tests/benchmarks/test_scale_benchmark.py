"""benchmarks/scale.py at its smoke size: every result line comes out, with sane values (the full size runs by hand)."""
from __future__ import annotations

import json

from benchmarks import scale


def test_smoke_scale_reports_every_result(tmp_path, capsys):
    scale.main(["--scale", "smoke", "--out", str(tmp_path), "--fetches", "50", "--nprobe", "16", "256"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    by = {}
    for row in rows:
        by.setdefault(row["result"], []).append(row)
    assert by["bank_build"][0]["references"] == 10_000 and by["bank_build"][0]["record_bytes"] == 1032
    assert {r["tier"] for r in by["fetch"]} >= {"ram", "disk"}
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in by["fetch"])
    build = by["index_build"][0]
    assert build["vectors"] == 100_000 and build["train_s"] > 0 and build["add_s"] > 0
    assert 40 <= by["index_bytes"][0]["file_bytes_per_vector"] < 80  # 32 B codes + 8 B list id + 8 B id map + lists
    search = {r["nprobe"]: r for r in by["search"]}
    assert search[16]["single"]["p50_ms"] > 0 and search[16]["batched"]["p99_ms"] > 0
    assert 0.2 < search[16]["recall_at_5"] <= search[256]["recall_at_5"]  # every list probed: only PQ error left
    assert search[256]["recall_5_at_50"] > 0.8
    assert not list(tmp_path.iterdir())  # the temporary bank is gone
