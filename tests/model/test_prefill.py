"""The prompt forward of model.generate and the serving engine (`Prefill`): padded to a length bucket and compiled,
it fills the KV cache and gives the last tokens' logits as the plain eager forward does."""
import pytest
import torch

from model.generate import MemoryWindows, Prefill, Retrieved

TOL = dict(atol=1e-4, rtol=1e-4)  # fp32: compiled kernels fuse and reorder sums (measured max error ~1e-6)


def _prefill(model, prefill, prompts, memories, n_valid, all_logits=True):
    """`prefill` of prompts into fresh caches (with reserved memory slots): last logits, all logits, caches."""
    cfg = model.cfg
    windows = MemoryWindows(model, lambda row, q: Retrieved(memories[row], n_valid[row], ids=[row]), len(prompts))
    model.setup_caches(len(prompts), cfg.max_seq_len, memory_slots=windows.reserved)
    caches = model.caches()
    for cache in caches:  # stale values where the padding writes: must never reach a real token
        cache.k.fill_(1e4), cache.v.fill_(1e4)
    last, full, events = prefill(prompts, caches, windows, all_logits=all_logits)
    model.clear_caches()
    return last, full, caches, events


def _prompts(cfg, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[2, 4] + torch.randint(5, cfg.vocab_size, (n - 2,), generator=g).tolist() for n in lengths]


def _check_same(model, got, want, lengths):
    """Last logits, the prompt positions' logits and the cache positions each prompt wrote agree."""
    (last, full, caches, events), (last_ref, full_ref, caches_ref, events_ref) = got, want
    torch.testing.assert_close(last, last_ref, **TOL)
    assert events == events_ref
    for i, n in enumerate(lengths):
        if full is not None:
            torch.testing.assert_close(full[i, :n], full_ref[i, :n], **TOL)
        torch.testing.assert_close(last[i], full_ref[i, n - 1], **TOL)
        for cache, ref in zip(caches, caches_ref):
            written = slice(cache.reserved, cache.reserved + n)
            torch.testing.assert_close(cache.k[i, :, written], ref.k[i, :, written], **TOL)
            torch.testing.assert_close(cache.v[i, :, written], ref.v[i, :, written], **TOL)


@pytest.mark.parametrize("memory", [True, False])
def test_padded_prefill_equals_unpadded(make_model, memory):
    model = make_model()
    cfg = model.cfg
    lengths = [21, 9, 30]
    memories = torch.randn(3, cfg.refs_per_window, *cfg.memory_shape)
    n_valid = torch.tensor([[4, 2], [0, 0], [1, 4]]) if memory else torch.zeros(3, 2, dtype=torch.long)
    prompts = _prompts(cfg, lengths)
    padded = Prefill(model)
    padded.bucket = 16  # 30 -> 32 positions, and windows past every prompt (no memory)
    want = _prefill(model, Prefill(model), prompts, memories, n_valid)
    got = _prefill(model, padded, prompts, memories, n_valid)
    _check_same(model, got, want, lengths)
    assert not torch.equal(got[0], _prefill(model, Prefill(model), prompts, memories.flip(0), n_valid)[0]), \
        "the memories change the logits (the comparison is not vacuous)"


def test_compiled_prefill_equals_eager_across_shapes_in_one_compilation(make_model):
    """On CPU (inductor's C++ kernels): two batch sizes and lengths, with memory, compile once (dynamic dims)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = make_model()
    cfg = model.cfg
    compiled = Prefill(model, compiled=True)
    assert compiled.compiled and compiled.bucket == Prefill.LENGTH_BUCKET
    memories = torch.randn(3, cfg.refs_per_window, *cfg.memory_shape)
    n_valid = torch.tensor([[4, 2], [3, 0], [1, 4]])
    torch._dynamo.utils.counters.clear()
    for lengths in ([21, 9, 30], [40, 17]):
        prompts = _prompts(cfg, lengths, seed=len(lengths))
        want = _prefill(model, Prefill(model), prompts, memories, n_valid)
        got = _prefill(model, compiled, prompts, memories, n_valid)
        _check_same(model, got, want, lengths)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])


@pytest.mark.parametrize("memory", [True, False])
def test_static_prefill_equals_plain_across_batch_and_length_buckets(make_model, memory):
    """The CUDA-graph path's shapes, run eagerly (CPU): batch padded to a bucket, length to GRAPH_LENGTH_BUCKET, a
    scratch cache copied into the destination rows. Same logits and cache as the plain prefill, whatever ran in the
    static buffers before (a smaller batch leaves stale rows behind); per-position logits take the plain path."""
    model = make_model()
    cfg = model.cfg
    static = Prefill(model, graphs=True, max_batch=4)
    memories = torch.randn(3, cfg.refs_per_window, *cfg.memory_shape)
    n_valid = torch.tensor([[4, 2], [0, 3], [1, 4]]) if memory else torch.zeros(3, 2, dtype=torch.long)
    for lengths in ([21, 9, 30], [70, 17], [5, 64, 11]):
        prompts = _prompts(cfg, lengths, seed=len(lengths) + max(lengths))
        want = _prefill(model, Prefill(model), prompts, memories, n_valid)
        got = _prefill(model, static, prompts, memories, n_valid, all_logits=False)
        assert got[1] is None
        _check_same(model, got, want, lengths)
    assert set(static._static) == {(4, 32, True), (2, 96, True), (4, 64, True)} and not static.replay  # all retrieve
    assert _prefill(model, static, prompts, memories, n_valid)[1] is not None  # all logits: the plain path
    assert not Prefill(model, graphs=True, max_batch=2)._shape(3, 10, False, cfg.max_seq_len), "past max_batch"
    assert not static._shape(1, Prefill.GRAPH_MAX_LEN + 1, False, 10**4), "past GRAPH_MAX_LEN: eager"
