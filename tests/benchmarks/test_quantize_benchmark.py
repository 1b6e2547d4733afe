"""`benchmarks/quantize.py --encode-speed` at a tiny size on the CPU: the torch path's row for a random codec of the
preset's codec shape (the kernel rows need CUDA)."""
from __future__ import annotations

import json
import sys

from benchmarks import quantize


def test_encode_speed_reports_the_torch_path(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quantize", *"--encode-speed --preset tiny --references 2 --repeats 1".split()])
    quantize.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["result"], r["path"], r["factory"]) for r in rows] == [
        ("encode_speed", "torch", "OPQ8_32,Residual2x14,PQ4x10")]
    assert rows[0]["vectors"] == 2 * 128 and rows[0]["vectors_per_second"] > 0 and rows[0]["codes_equal_torch"] == 1
