"""The decode step of model.generate and the serving engine (`Transformer.decode`, `DecodeStep`) against the forms
it replaces: memories in reserved cache slots equal the per-step concatenation, and attention over a length bucket
equals attention over the whole cache."""
import pytest
import torch

from model.generate import DecodeStep, MemoryWindows, Retrieved
from model.transformer import MemoryBatch

SINK = [2, 4]


def _prefilled(model, B, T, memories, n_valid):
    """Caches with reserved memory slots, B rows prefilled with T tokens; memories written by MemoryWindows."""
    cfg = model.cfg
    windows = MemoryWindows(model, lambda row, q: Retrieved(memories[row], n_valid[row]), B)
    model.setup_caches(B, cfg.max_seq_len, memory_slots=windows.reserved)
    idx = torch.randint(5, cfg.vocab_size, (B, T))
    model(idx)  # prefill (no prompt memory: only the decode step is compared here)
    for b in range(B):
        windows.current[b], windows.n_valid[b], _ = windows.fetch(b, [])
    windows.changed.update(range(B))
    windows.write_caches(model.caches())
    return windows


@pytest.mark.parametrize("positions", ["parallel", "ranked"])
def test_reserved_memory_slots_equal_concatenated_memories(make_model, positions):
    """eq. 4 while decoding: one softmax over [memories, causal context]; the memories may sit in the cache's
    reserved slots (written once per window) or be concatenated to the cache at every step."""
    model = make_model(memory_positions=positions)
    cfg = model.cfg
    B, T, M = 3, 21, cfg.refs_per_window
    memories = torch.randn(B, M, *cfg.memory_shape)
    n_valid = torch.tensor([[4, 2], [0, 0], [1, 4]])  # partly filled slots and a row without memory
    windows = _prefilled(model, B, T, memories, n_valid)
    tok = torch.randint(5, cfg.vocab_size, (B, 1))
    pos = torch.tensor([[T], [T - 4], [T - 1]])  # rows at different lengths
    fast = model.decode(tok, pos, key_len=cfg.max_seq_len, memory_valid=windows.valid)

    visible = torch.ones(B, 1, M, dtype=torch.bool)
    batch = MemoryBatch.from_references(memories, n_valid, visible, torch.full_like(pos, cfg.sink_len), cfg)
    model.use_caches([c.rows(0, B) for c in model.caches()])
    concat = model(tok, input_pos=pos, memory=batch)[:, -1]  # the concatenated form over the whole cache
    model.clear_caches()
    torch.testing.assert_close(fast, concat, atol=1e-5, rtol=1e-5)


def test_attention_over_a_length_bucket_equals_the_whole_cache(make_model):
    model = make_model()
    cfg = model.cfg
    B, T, M = 2, 37, cfg.refs_per_window
    windows = _prefilled(model, B, T, torch.randn(B, M, *cfg.memory_shape), torch.tensor([[4, 3], [2, 4]]))
    model.caches()[0].k[:, :, windows.reserved + T + 1:] = 1e4  # stale keys past every row's length: never read
    tok, pos = torch.randint(5, cfg.vocab_size, (B, 1)), torch.tensor([[T], [T - 9]])
    bounded = model.decode(tok, pos, key_len=T + 1, memory_valid=windows.valid)
    full = model.decode(tok, pos, key_len=cfg.max_seq_len, memory_valid=windows.valid)
    model.clear_caches()
    torch.testing.assert_close(bounded, full, atol=1e-5, rtol=1e-5)


def test_decode_step_pads_to_a_batch_bucket_and_rounds_the_length_up(make_model):
    """Three rows run in the 4-row bucket with a 128-multiple key length: the same logits as exactly 3 rows."""
    model = make_model(max_seq_len=300)
    cfg = model.cfg
    B, T, M = 5, 30, cfg.refs_per_window
    windows = _prefilled(model, B, T, torch.randn(B, M, *cfg.memory_shape), torch.full((B, M), 4))
    step = DecodeStep(model, model.caches(), windows.valid)
    step.tokens[:] = torch.randint(5, cfg.vocab_size, (B, 1))
    step.pos[:] = torch.tensor([[T], [T - 1], [T - 2], [0], [0]])
    got = step(3, T + 1, memory=True)
    model.use_caches([c.rows(0, 3) for c in step.caches])
    want = model.decode(step.tokens[:3], step.pos[:3], key_len=T + 1, memory_valid=windows.valid[:3])
    model.clear_caches()
    assert got.shape == (3, cfg.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
