"""Explicit-memory attention: the training form, the decoding form and the definition agree (paper eq. 4)."""
import math

import pytest
import torch

from model.encoder import encode_references
from model.generate import Retrieved, generate
from model.transformer import MemoryBatch, apply_rope, rank_memory_positions, rope_tables

SINK = [2, 4]


def test_memory_equals_reference_as_prefix(make_model):
    """All layers are memory layers and every token is kept: reading the reference's memory must equal running
    the plain model over [sink, reference, context], because memories sit exactly where the reference's tokens
    would (parallel position interval after the sink)."""
    model = make_model(n_mem_layer=3, mem_tokens=16)
    cfg = model.cfg
    ref = torch.randint(5, cfg.vocab_size, (1, cfg.reference_len))
    mem = encode_references(model, ref, torch.tensor([cfg.reference_len]), SINK)
    ctx = torch.tensor([SINK + [2] + torch.randint(5, cfg.vocab_size, (13,)).tolist()])
    pos = torch.arange(ctx.shape[1])[None]
    batch = MemoryBatch.from_references(mem.memories[None], mem.n_valid[None], torch.ones(1, 1, 1, dtype=torch.bool),
                                        pos, cfg)
    with_memory = model(ctx, memory=batch)
    concat = torch.cat([ctx[:, :2], ref, ctx[:, 2:]], dim=1)
    plain = model(concat, rope_pos=torch.arange(concat.shape[1])[None])
    torch.testing.assert_close(with_memory[:, 2:], plain[:, 2 + cfg.reference_len:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_memory[:, :2], plain[:, :2], atol=1e-6, rtol=1e-6)
    # and the memory is really read: without it the context logits differ
    assert (model(ctx)[:, 2:] - plain[:, 2 + cfg.reference_len:]).abs().max() > 1e-3


def test_attention_layer_matches_eq4(make_model):
    """One memory layer against a direct transcription of eq. 4: a single softmax over memory keys and causal
    context keys, GQA heads sharing their KV head's memory."""
    model = make_model()
    cfg, attn = model.cfg, model.layers[0].self_attn
    B, T, S = 2, 11, 6
    x = torch.randn(B, T, cfg.dim)
    pos = torch.arange(T).expand(B, T)
    mem_k, mem_v = torch.randn(B, cfg.n_kv_head, S, cfg.head_dim), torch.randn(B, cfg.n_kv_head, S, cfg.head_dim)
    mem_mask = torch.rand(B, T, S) > 0.4
    mem_mask[:, : cfg.sink_len] = False
    cos, sin = rope_tables(cfg, cfg.rope_position(pos), x.dtype)
    mask = torch.cat([mem_mask, pos[:, None, :] <= pos[:, :, None]], dim=-1)
    got = attn(x, cos, sin, pos, mask, (mem_k, mem_v))

    q = apply_rope(attn.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
    out = torch.zeros(B, cfg.n_head, T, cfg.head_dim)
    for b in range(B):
        for h in range(cfg.n_head):
            g = h // cfg.group_size
            for i in range(T):
                keys = [mem_k[b, g, s] for s in range(S) if mem_mask[b, i, s]] + [k[b, g, j] for j in range(i + 1)]
                vals = [mem_v[b, g, s] for s in range(S) if mem_mask[b, i, s]] + [v[b, g, j] for j in range(i + 1)]
                w = torch.softmax(torch.stack([q[b, h, i] @ kk for kk in keys]) / math.sqrt(cfg.head_dim), 0)
                out[b, h, i] = (w[:, None] * torch.stack(vals)).sum(0)
    want = attn.o_proj(out.transpose(1, 2).reshape(B, T, cfg.dim))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _window_memories(model, n_windows, n_slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    refs = torch.randint(5, cfg.vocab_size, (n_windows * n_slots, cfg.reference_len), generator=g)
    lengths = torch.randint(cfg.mem_tokens - 1, cfg.reference_len + 1, (n_windows * n_slots,), generator=g)
    mem = encode_references(model, refs, lengths, SINK)
    return mem.memories.view(n_windows, n_slots, *mem.memories.shape[1:]), mem.n_valid.view(n_windows, n_slots)


@pytest.mark.parametrize("positions", ["parallel", "ranked"])
def test_training_form_equals_window_by_window_decoding_form(make_model, positions):
    """The block-masked forward (every window sees its own memories) equals processing the sequence one window at
    a time with the KV cache, swapping the memory part before each window."""
    model = make_model(memory_positions=positions)
    cfg = model.cfg
    W, M = 4, cfg.refs_per_window
    T = cfg.sink_len + W * cfg.window
    idx = torch.randint(5, cfg.vocab_size, (2, T))
    mems, n_valid = _window_memories(model, W, M)
    mems, n_valid = torch.stack([mems, mems.flip(0)]), torch.stack([n_valid, n_valid.flip(0)])  # rows differ
    visible = torch.eye(W, dtype=torch.bool).repeat_interleave(M, dim=1).expand(2, -1, -1)
    pos = torch.arange(T).expand(2, T)
    full = model(idx, memory=MemoryBatch.from_references(mems.flatten(1, 2), n_valid.flatten(1), visible, pos, cfg))

    model.setup_caches(2, T)
    pieces = []
    bounds = [0, cfg.sink_len + cfg.window] + [cfg.sink_len + w * cfg.window for w in range(2, W + 1)]
    for w, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        p = torch.arange(lo, hi).expand(2, -1)
        only = torch.ones(2, 1, M, dtype=torch.bool)
        mb = MemoryBatch.from_references(mems[:, w], n_valid[:, w], only, p, cfg)
        pieces.append(model(idx[:, lo:hi], input_pos=p, memory=mb))
    model.clear_caches()
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["parallel", "ranked"])
def test_kv_cache_decoding_with_memory_swaps_equals_full_forward(make_model, positions):
    """Greedy decoding re-retrieves every window; replaying the final sequence in one forward with each window's
    memories must give the same logits at every generated position."""
    model = make_model(memory_positions=positions)
    cfg = model.cfg
    bank_mem, bank_valid = _window_memories(model, 6, cfg.refs_per_window, seed=1)
    calls = []

    def retrieve(row, query):  # deterministic, query-dependent choice of one of 6 memory sets
        pick = (sum(query) + row) % 6
        calls.append((row, pick))
        return Retrieved(bank_mem[pick], bank_valid[pick], ids=[pick])

    prompts = [SINK + [2] + torch.randint(5, cfg.vocab_size, (n,)).tolist() for n in (13, 5)]
    steps = list(generate(model, prompts, max_new_tokens=[30, 25], retrieve=retrieve))
    seqs = [list(p) for p in prompts]
    for s in steps:
        for b, t in enumerate(s.tokens):
            if t is not None:
                seqs[b].append(t)
    # which memory set each window of each row used, from the retrieval events
    used = {}
    for s in steps:
        for row, window, ids in s.retrievals:
            used[(row, window)] = ids[0]
    for b, seq in enumerate(seqs):
        T = len(seq)
        W = (T - 1 - cfg.sink_len) // cfg.window + 1
        window_set, last = [], None
        for w in range(W):
            last = used.get((b, w), last)  # a window without an event keeps the previous memories
            window_set.append(last)
        mems = torch.stack([bank_mem[i] for i in window_set])  # (W, M, ...)
        n_valid = torch.stack([bank_valid[i] for i in window_set])
        visible = torch.eye(W, dtype=torch.bool).repeat_interleave(cfg.refs_per_window, dim=1)[None]
        pos = torch.arange(T)[None]
        mb = MemoryBatch.from_references(mems.flatten(0, 1)[None], n_valid.flatten()[None], visible, pos, cfg)
        full = model(torch.tensor([seq]), memory=mb)[0]
        gen_logits = torch.stack([s.logits[b] for s in steps if s.tokens[b] is not None])
        n = len(gen_logits)
        torch.testing.assert_close(gen_logits, full[len(prompts[b]) - 1: len(prompts[b]) - 1 + n], atol=1e-4,
                                   rtol=1e-4)
    assert len({r for r, _ in calls}) == 2 and len(calls) > 4  # both rows re-retrieved while generating


def test_ranked_positions_equal_encoding_the_reference_earlier(make_model):
    """'ranked' moves a window's j-th memory j * reference_len positions back: its stored keys (rotated at their
    position in the reference) come out rotated as if that position were j * reference_len smaller, values
    untouched, in every window of the slot layout."""
    model = make_model(memory_positions="ranked")
    cfg = model.cfg
    W, M = 2, cfg.refs_per_window
    raw = torch.randn(1, W * M, *cfg.memory_shape)  # un-rotated keys and values
    at = torch.randint(0, cfg.reference_seq_len, (cfg.mem_tokens,))  # each kept token's position

    def rotated(keys, shift):  # keys (..., k, D) rotated at `at` - shift
        cos, sin = rope_tables(cfg, (at - shift)[None], torch.float32)  # (1, 1, k, D)
        return apply_rope(keys, cos[0], sin[0])

    stored = raw.clone()
    stored[:, :, :, 0] = rotated(raw[:, :, :, 0], 0)
    got = rank_memory_positions(stored, cfg)
    for m in range(W * M):
        want = rotated(raw[:, m, :, 0], (m % M) * cfg.reference_len)
        torch.testing.assert_close(got[:, m, :, 0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, :, :, 1], stored[:, :, :, 1])


@pytest.mark.parametrize("positions", ["parallel", "ranked"])
def test_memory_order_matters_only_when_ranked(make_model, positions):
    """Parallel positions make the read order-free (§3.2); ranked ones make the best match distinguishable."""
    model = make_model(memory_positions=positions)
    cfg = model.cfg
    mems, n_valid = _window_memories(model, 1, cfg.refs_per_window)
    idx = torch.randint(5, cfg.vocab_size, (1, cfg.sink_len + 7))
    pos = torch.arange(idx.shape[1])[None]
    visible = torch.ones(1, 1, cfg.refs_per_window, dtype=torch.bool)
    out = [model(idx, memory=MemoryBatch.from_references(m[None], v[None], visible, pos, cfg))
           for m, v in ((mems[0], n_valid[0]), (mems[0].flip(0), n_valid[0].flip(0)))]
    same = torch.allclose(out[0], out[1], atol=1e-5, rtol=1e-5)
    assert same == (positions == "parallel")


def test_retrieval_schedule_matches_paper_count(make_model):
    """128 prompt tokens + 128 generated with 64-token windows: 3 retrievals (paper §3.2)."""
    model = make_model(window=64, max_seq_len=300)
    cfg = model.cfg
    mem, valid = _window_memories(model, 1, cfg.refs_per_window)
    queries = []

    def retrieve(row, query):
        queries.append(len(query))
        return Retrieved(mem[0], valid[0])

    prompt = SINK + [2] + torch.randint(5, cfg.vocab_size, (127,)).tolist()  # 128 context tokens
    list(generate(model, [prompt], max_new_tokens=128, retrieve=retrieve))
    assert queries == [64, 64, 64]


def test_a_row_stopped_before_a_window_reports_no_retrieval_for_it(make_model):
    """`generate` launches each step before the previous token reaches the host: a row ended by a stop token that
    would have been fed first in a new window may have been retrieved for, but reports no retrieval for that
    window, as a step-by-step loop would not; its tokens are those of the run without the stop, cut at it."""
    model = make_model(window=8, vocab_size=1000)  # varied enough for a token row 1 does not soon repeat
    cfg = model.cfg
    bank_mem, bank_valid = _window_memories(model, 3, cfg.refs_per_window, seed=2)

    def retrieve(row, query):
        pick = sum(query) % 3
        return Retrieved(bank_mem[pick], bank_valid[pick], ids=[pick])

    prompts = [SINK + [2] + torch.randint(5, cfg.vocab_size, (n,)).tolist() for n in (9, 4)]
    free = list(generate(model, prompts, max_new_tokens=30, retrieve=retrieve))
    tokens = [[s.tokens[b] for s in free] for b in range(2)]

    def first_at(i: int) -> bool:  # row 0's token i (fed first in a window) stops row 0 there and row 1 later
        j = i - len(prompts[0])
        return cfg.starts_window(i) and 1 <= j and tokens[0][j] not in tokens[0][:j] + tokens[1][:j + 2]

    index = next(i for i in range(len(prompts[0]), len(prompts[0]) + 25) if first_at(i))
    stop = tokens[0][index - len(prompts[0])]
    stopped = list(generate(model, prompts, max_new_tokens=30, retrieve=retrieve, stop_ids={stop}))
    row0 = [s.tokens[0] for s in stopped if s.tokens[0] is not None]
    assert row0 == tokens[0][:index - len(prompts[0]) + 1] and row0[-1] == stop
    # the stop token would have been fed first in its window: that window's retrieval is not reported
    windows0 = [w for s in stopped for row, w, _ in s.retrievals if row == 0]
    free_windows0 = [w for s in free for row, w, _ in s.retrievals if row == 0]
    assert cfg.window_of(index) in free_windows0 and cfg.window_of(index) not in windows0
    assert windows0 == [w for w in free_windows0 if w < cfg.window_of(index)]
    row1 = [s.tokens[1] for s in stopped if s.tokens[1] is not None]  # the other row: unchanged up to its own stop
    cut = tokens[1].index(stop) + 1 if stop in tokens[1] else len(tokens[1])
    assert row1 == tokens[1][:cut]


def test_empty_memory_slots_change_nothing(make_model):
    """Slots with no valid tokens are masked out: the result equals the no-memory forward."""
    model = make_model()
    cfg = model.cfg
    T = cfg.sink_len + 2 * cfg.window
    idx = torch.randint(5, cfg.vocab_size, (1, T))
    mems = torch.randn(1, 2, cfg.n_mem_layer, 2, cfg.n_kv_head, cfg.mem_tokens, cfg.head_dim)
    mb = MemoryBatch.from_references(mems, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.bool),
                                     torch.arange(T)[None], cfg)
    torch.testing.assert_close(model(idx, memory=mb), model(idx), atol=1e-6, rtol=1e-6)


def test_flex_form_pads_to_its_block_and_matches_masked_sdpa():
    """The FlexAttention form (whole-sequence CUDA forwards with memory) pads an odd length to FLEX_BLOCK (2047
    unpadded queries ran 2.4x slower); the padding must change nothing. Runs FlexAttention's CPU forward."""
    import torch.nn.functional as F

    from model.transformer import FLEX_BLOCK, flex_attention, flex_block_mask

    B, H, Hkv, T, S, D = 2, 4, 2, 37, 6, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, S + T, D, generator=g), torch.randn(B, Hkv, S + T, D, generator=g)
    pos = torch.arange(T).expand(B, T)
    mem_mask = torch.rand(B, T, S, generator=g) > 0.5
    block_mask = flex_block_mask(pos, mem_mask)
    assert block_mask.seq_lengths == (FLEX_BLOCK, S + FLEX_BLOCK)
    got = flex_attention(q, k, v, block_mask)
    full = torch.cat([mem_mask, pos[:, None, :] <= pos[:, :, None]], dim=-1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=full[:, None], enable_gqa=True)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
