"""`benchmarks/model.py`'s decode rows: only the graphed step with --no-eager, a kernel profile per variant, and the
GEMV rows (each weight shape read alone)."""
from __future__ import annotations

import json
import sys

from benchmarks import model as bench


def test_no_eager_times_only_the_compiled_step_and_profile_counts_kernels(monkeypatch, capsys):
    argv = "--preset tiny --device cpu --decode-only --decode-tokens 4 --compile --no-eager --profile --fuse 0 1"
    monkeypatch.setattr(sys, "argv", ["model", *argv.split()])
    bench.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    decode = [r for r in rows if r["bench"] == "decode"]
    assert [(r["fused_projections"], r["memory"]) for r in decode] == [
        (False, "none"), (False, "memory"), (True, "none"), (True, "memory")]
    assert all(r["compiled"] and r["tokens_per_s"] > 0 for r in decode)
    profiles = [r for r in rows if r["bench"] == "decode_profile"]
    assert len(profiles) == 4 and all(r["kernels_per_token"] > 0 and r["top"] for r in profiles)
    # where a token's time goes: kernel time, a step replayed alone, and the wall time (on a CPU the "kernels" are ops
    # of a separate profiled run, so no order between them holds on a busy machine)
    assert all(r["kernel_ms_per_token"] > 0 and r["step_ms"] > 0 and r["wall_ms_per_token"] > 0 for r in profiles)
    gemvs = [r for r in rows if r["bench"] == "gemv"]  # one row per weight shape of the fused model (tiny: 5)
    fused = bench.Transformer(bench.ModelConfig.from_name("tiny")).fuse_projections()
    shapes = {tuple(m.weight.shape) for m in fused.modules() if isinstance(m, bench.torch.nn.Linear)}
    assert {tuple(r["shape"]) for r in gemvs} == shapes and all(r["gb_s"] > 0 for r in gemvs)



def test_prefill_rows_time_the_serving_prefill_with_its_window_retrievals(monkeypatch, capsys):
    argv = "--preset tiny --device cpu --decode-only --decode-tokens 2 --fuse 1 --prefill-batch 1 3"
    monkeypatch.setattr(sys, "argv", ["model", *argv.split()])
    bench.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    prefill = {(r["memory"], r["batch"]): r for r in rows if r["bench"] == "prefill"}
    assert sorted(prefill) == [("memory", 1), ("memory", 3), ("none", 1), ("none", 3)]
    windows = bench.ModelConfig.from_name("tiny").n_windows(prefill["none", 1]["prompt_tokens"])
    for (memory, batch), row in prefill.items():  # every prompt window of every row retrieves, once per prefill
        assert row["ms"] > 0 and row["retrievals"] == (batch * windows if memory == "memory" else 0)
