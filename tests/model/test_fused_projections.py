"""`Transformer.fuse_projections`: one GEMM for q/k/v and one for gate/up compute what the separate projections
compute, in every path a served model runs (forward with memory, decoding, encoding memories)."""
import copy

import pytest
import torch

from model.encoder import encode_references
from model.generate import Prefill, Retrieved, generate
from model.transformer import MemoryBatch

SINK = [2, 4]


def fused_pair(make_model, **overrides):
    model = make_model(**overrides)
    return model, copy.deepcopy(model).fuse_projections()


def test_fused_model_has_four_projections_per_layer_and_the_same_weights(make_model):
    model, fused = fused_pair(make_model)
    layer, fused_layer = model.layers[1], fused.layers[1]
    assert not hasattr(fused_layer.self_attn, "q_proj") and not hasattr(fused_layer.mlp, "gate_proj")
    assert sum(isinstance(m, torch.nn.Linear) for m in fused_layer.modules()) == 4  # qkv, o, gate_up, down
    attn = layer.self_attn
    torch.testing.assert_close(fused_layer.self_attn.qkv_proj.weight,
                               torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), rtol=0, atol=0)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    assert fused.fuse_projections() is fused  # fusing twice is a no-op


def test_fused_forward_with_memory_equals_the_separate_projections(make_model):
    model, fused = fused_pair(make_model)
    cfg = model.cfg
    refs = torch.randint(5, cfg.vocab_size, (2, cfg.reference_len))
    mem = encode_references(model, refs, torch.tensor([cfg.reference_len, 9]), SINK)
    fused_mem = encode_references(fused, refs, torch.tensor([cfg.reference_len, 9]), SINK)
    torch.testing.assert_close(fused_mem.memories, mem.memories, atol=1e-5, rtol=1e-5)  # the encoder's capture path
    assert torch.equal(fused_mem.positions, mem.positions)  # the same tokens kept
    ctx = torch.tensor([SINK + torch.randint(5, cfg.vocab_size, (20,)).tolist()])
    pos = torch.arange(ctx.shape[1])[None]
    batch = MemoryBatch.from_references(mem.memories[None], mem.n_valid[None], torch.ones(1, 3, 2, dtype=torch.bool),
                                        pos, cfg)
    expected = model(ctx, memory=batch)
    torch.testing.assert_close(fused(ctx, memory=batch), expected, atol=1e-5, rtol=1e-5)
    assert (model(ctx) - expected).abs().max() > 1e-3  # the memory is read, so the comparison covers that path


def test_fused_decoding_with_memory_equals_the_separate_projections(make_model):
    model, fused = fused_pair(make_model)
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    memories = torch.randn(cfg.refs_per_window, *cfg.memory_shape, generator=g)
    n_valid = torch.full((cfg.refs_per_window,), cfg.mem_tokens)

    def retrieve(row, query):
        return Retrieved(memories, n_valid)

    prompts = [SINK + torch.randint(5, cfg.vocab_size, (n,), generator=g).tolist() for n in (13, 21)]
    runs = [list(generate(m, prompts, max_new_tokens=[24, 30], retrieve=retrieve)) for m in (model, fused)]
    assert [s.tokens for s in runs[1]] == [s.tokens for s in runs[0]]
    for a, b in zip(*runs):
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    assert sum(len(s.retrievals) for s in runs[0]) >= 4  # windows were crossed: memories were retrieved and read


def test_fusing_after_a_step_was_compiled_is_refused(make_model):
    model = make_model()
    Prefill(model, compiled=True)  # registers the model's compiled prompt forward, bound to its current weights
    with pytest.raises(RuntimeError, match="before the model's decode steps"):
        model.fuse_projections()
