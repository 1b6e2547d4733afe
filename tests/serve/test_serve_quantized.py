"""Serving from a quantized bank (paper App. B): real Ray Serve, real HTTP, a bank that stores VQ codes of the
paper's structure (OPQ rotation, 2-part residual coarse quantizer, PQ codes that straddle bytes), trained by the
encode job's own quantizer task. The memory-store replica dequantizes what the generator attends to."""
from __future__ import annotations

import httpx
import pytest
import torch
from ray import serve

from bank.reader import MemoryBank
from model.quantizer import relative_error
from serve_testing import build_bank, city_documents, serving
from test_bank import direct_memories  # tests/bank's helper: the encoder's memories without the bank

APP, MODEL = "memory3-vq-test", "memory3"
FACTORY = "OPQ8_32,Residual2x4,PQ8x6"  # 7 B per 32-dim key/value vector instead of 64 in bf16
PROMPT = "Osaka is a city in Japan. It has a population of about 548 thousand people."


@pytest.fixture(scope="module")
def vq_bank(tiny_checkpoint, tmp_path_factory) -> str:
    return build_bank(str(tmp_path_factory.mktemp("vq") / "bank"), tiny_checkpoint, city_documents(), FACTORY)


@pytest.fixture(scope="module")
def server(ray_local, tiny_checkpoint, vq_bank):
    args = {"checkpoint": tiny_checkpoint, "bank": vq_bank, "model_name": MODEL,
            "decoding": {"max_batch_size": 4, "seed": 0}, "memory": {"cache_size": 0}}
    with serving(APP, args) as url, httpx.Client(base_url=url, timeout=120) as http:
        yield http


def complete(http: httpx.Client, **body) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_answers_read_memories_dequantized_from_vq_codes(server, vq_bank, tiny_checkpoint):
    bank = MemoryBank.open(vq_bank, verify=True)
    assert bank.layout.codec == "faiss" and bank.manifest["quantizer"]["factory"] == FACTORY
    assert bank.layout.code_size == 7 and bank.layout.record_bytes == 8 + bank.layout.vectors * 7

    memory = complete(server, prompt=PROMPT, max_tokens=8, temperature=0, memory_mode="memory")
    none = complete(server, prompt=PROMPT, max_tokens=8, temperature=0, memory_mode="none")
    assert memory["memories"][0]["id"] == "city-1#0" and memory["memories"][0]["windows"] == [0]
    assert memory["usage"]["completion_tokens"] >= 1 and none["memories"] == []
    scores = {mode: complete(server, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0, memory_mode=mode)
              ["choices"][0]["logprobs"]["token_logprobs"] for mode in ("memory", "none")}
    assert scores["memory"] != pytest.approx(scores["none"])  # the dequantized memories were attended to

    store = serve.get_deployment_handle("MemoryStore", APP)
    stats = store.stats.remote().result()
    assert stats["misses"] >= 1 and stats["bytes_read"] % bank.layout.record_bytes == 0
    rows = [bank.row_of("city-1#0"), bank.row_of("city-3#0")]
    served, n_valid = store.fetch.remote(rows).result()  # what the generator receives, over Ray
    expected, expected_n = bank.memories(rows)  # the codes decoded by FAISS, padding slots zeroed
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
    assert n_valid.tolist() == expected_n.tolist()
    direct = direct_memories(tiny_checkpoint, bank.records(rows)).memories  # what the encoder wrote, before VQ
    assert relative_error(direct, served) < 0.6  # a real reconstruction: zeros or noise would give >= 1
