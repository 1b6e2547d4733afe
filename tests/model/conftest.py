import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer


def small_config(**overrides) -> ModelConfig:
    """A shape small enough for exact CPU checks but with GQA (2 query heads per KV head) and 2 memory layers."""
    base = dict(vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, head_dim=8, mlp_hidden=48, max_seq_len=300,
                n_mem_layer=2, reference_len=16, mem_tokens=4, window=8, refs_per_window=2)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def no_grad():
    """Model tests compare forward values: no autograd (scoped to each test, never the whole session)."""
    with torch.no_grad():
        yield


@pytest.fixture
def make_model():
    def make(seed: int = 0, **overrides) -> Transformer:
        torch.manual_seed(seed)
        model = Transformer(small_config(**overrides)).eval()
        with torch.no_grad():  # non-trivial norms so the tests would see a misplaced one
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.uniform_(0.5, 1.5)
        return model

    return make
