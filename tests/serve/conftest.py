"""Serve fixtures: a random-weight tiny checkpoint and a small real memory bank (serve_testing.py builds them)."""
from __future__ import annotations

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from serve_testing import build_bank, city_documents


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """Random weights in the tiny preset, with a tokenizer trained on the fixture's documents."""
    torch.manual_seed(0)
    texts = [d["text"] for d in city_documents()] * 3 + ["System: User: Assistant: Reference: the a of in is"]
    tokenizer = Tokenizer.train(texts, vocab_size=600)
    # the preset's shape with this tokenizer's vocabulary, so every token the random model picks decodes to text
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)).eval()
    path = tmp_path_factory.mktemp("serve") / "checkpoint"
    save_checkpoint(path, model, tokenizer, meta={"stage": "random"})
    return str(path)


@pytest.fixture(scope="session")
def tiny_bank(tiny_checkpoint, tmp_path_factory) -> str:
    return build_bank(str(tmp_path_factory.mktemp("serve") / "bank"), tiny_checkpoint, city_documents())
