"""The one answer decoder of `memory3 eval`, the quickstart and benchmarks/reading.py."""
import pytest
import torch

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from pipelines.answers import decode_answers, normalise

TEXTS = [f"Question: Which country is city {i} in? Answer: Country {i % 7}" for i in range(200)]


def test_a_prompt_near_the_context_limit_gets_the_tokens_that_fit():
    """A long RAG prompt is answered with fewer new tokens, not refused; one past the limit is an error."""
    tk = Tokenizer.train(TEXTS, 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tk.vocab_size, n_layer=2, n_head=2, n_kv_head=1, head_dim=8,
                                    mlp_hidden=32, max_seq_len=64, n_mem_layer=1, reference_len=16, mem_tokens=4,
                                    window=16, refs_per_window=2)).eval()
    short = tk.context_ids("Question: Which country is city 3 in? Answer:")
    long, full = (short * 64)[:61], (short * 64)[:64]
    with torch.no_grad():
        answers = decode_answers(model, tk, [short, long, full], max_new_tokens=8)  # 8, 3 and 0 new tokens
        assert len(answers) == 3 and answers[2] == ""
        with pytest.raises(ValueError, match="exceeds max_seq_len"):
            decode_answers(model, tk, [(short * 64)[:65]], max_new_tokens=8)


def test_exact_match_ignores_case_full_stops_and_spacing():
    assert normalise(" United  States.") == normalise("united states") == "united states"
