"""A shortened `memory3 quickstart`: the whole pipeline end to end on the bundled corpus (real Ray Data, Ray
Train + DeepSpeed, FAISS, Ray Serve over HTTP). Explicit memory must beat no memory on cities whose facts exist
only in the memory bank, by a clear margin."""
import json
import socket

import pytest

from configs import load_config

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_short_quickstart_memory_beats_no_memory(tmp_path, ray_local):
    from pipelines.quickstart import main

    overrides = [f"out={tmp_path / 'qs'}", f"serve.port={free_port()}",
                 "corpus.n_trained=300", "corpus.n_continual=400", "corpus.n_memory_only=80",
                 "warmup.max_steps=250", "continual.max_steps=250", "eval.limit_per_group=60",
                 "eval.speed_prompts=2", "probes.knowledge_update=10", "probes.counterfactual=5", "serve.questions=2"]
    assert main(load_config("quickstart", overrides)) == 0
    out = tmp_path / "qs"
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    # the claim: facts only in memory are answered with memory, not without (log-likelihood is the smoother signal)
    assert acc["memory"]["memory_only"] > acc["none"]["memory_only"] + 0.1, acc
    assert acc["memory"]["memory_only_answer_logprob"] > acc["none"]["memory_only_answer_logprob"] + 1.0, acc
    assert set(acc) == {"memory", "none", "rag"} and set(report["speed"]) == {"memory", "none", "rag"}
    # every artefact the README promises
    for name in ("report.md", "report.json", "loss.png", "accuracy.png", "speed.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "bank" / "manifest.json").is_file()
    assert len(report["http_answers"]) == 2 and all(a["memories"] for a in report["http_answers"])
    # the modes are compared on the same retrieved references, question by question
    results = json.loads((out / "results.json").read_text())
    assert [r["references"] for r in results["memory"]] == [r["references"] for r in results["rag"]]
    assert all(r["references"] for r in results["memory"])

