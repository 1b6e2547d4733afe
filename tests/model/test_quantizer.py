"""Vector-quantized memory: bounded reconstruction error, and the byte counts `memory3 info` reports."""
import numpy as np
import pytest
import torch

from configs import load_config
from memory3.info import describe
from model.config import ModelConfig
from model.encoder import encode_references
from model.quantizer import MemoryQuantizer, relative_error



@pytest.fixture(scope="module")
def memories():
    from model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", vocab_size=300)
    model = Transformer(cfg).eval()
    tokens = torch.randint(5, 300, (400, cfg.reference_len))
    return cfg, encode_references(model, tokens, torch.full((400,), cfg.reference_len), [2, 4]).memories


def test_roundtrip_error_is_bounded(memories):
    cfg, mem = memories
    train, test = mem[:300], mem[300:]
    q = MemoryQuantizer("OPQ8_32,PQ8x8", cfg.head_dim)
    q.train(train)
    codes = q.encode(test)
    assert codes.dtype == np.uint8 and codes.shape == (*test.shape[:-1], q.code_size)
    restored = q.decode(codes)
    err = relative_error(test, restored)
    # a real codec beats replacing every vector by the training mean by a wide margin
    mean = train.reshape(-1, cfg.head_dim).mean(0)
    baseline = relative_error(test, mean.expand_as(test))
    assert err < 0.35, err
    assert err < 0.5 * baseline, (err, baseline)
    again = MemoryQuantizer.from_bytes(q.to_bytes(), q.factory, cfg.head_dim)
    assert np.array_equal(again.encode(test), codes)  # codebooks survive serialisation


def test_paper_quantizer_is_14_bytes_and_matches_info():
    cfg = load_config("info", ["model=2.4b"])
    info = describe(cfg)
    q = MemoryQuantizer(cfg.quantizer, 80)
    vectors = 22 * 2 * 8 * 8
    assert q.code_size == 14
    assert info["reference_memory_bytes"] == {"dense": 72_089_600, "sparse": vectors * 80 * 2,
                                              "quantized": vectors * 14}
    assert info["reference_memory_bytes"]["quantized"] == 39_424  # paper App. B: 2816 vectors x 14 B


def test_quantized_bytes_match_info_for_tiny(memories):
    cfg, mem = memories
    info = describe(load_config("info", ["model=tiny", "quantizer=OPQ8_32,PQ8x8"]))
    q = MemoryQuantizer("OPQ8_32,PQ8x8", cfg.head_dim)
    q.train(mem[:300])
    assert q.encode(mem[:1]).nbytes == info["reference_memory_bytes"]["quantized"]
    assert mem[:1].to(torch.bfloat16).numel() * 2 == info["reference_memory_bytes"]["sparse"]


def test_bad_factory_and_untrained_use_fail_clearly():
    with pytest.raises(ValueError, match="FAISS cannot build"):
        MemoryQuantizer("NotAnIndex", 32)
    with pytest.raises(RuntimeError, match="not trained"):
        MemoryQuantizer("PQ4x8", 32).encode(np.zeros((2, 32), dtype=np.float32))
