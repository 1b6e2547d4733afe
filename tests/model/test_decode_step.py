"""The decode step of model.generate and the serving engine (`Transformer.decode`, `DecodeStep`) against the forms
it replaces: memories in reserved cache slots equal the per-step concatenation, and attention over a length bucket
equals attention over the whole cache."""
import threading

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


def test_the_compiled_step_compiles_once_per_memory_or_not_over_every_bucket(make_model):
    """A server meets every (batch bucket, length bucket, memory) as traffic varies, and each compilation stalls
    every request in flight (70-100 s at 2.4B). The step is generic in the batch and the length from its first
    shape on, and a single row runs in the 2-row bucket (torch would specialize a size of 1): one compilation with
    memory and one without, whatever the order the shapes come in, then none."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = make_model(max_seq_len=384)
    B, T, M = 4, 30, model.cfg.refs_per_window
    windows = _prefilled(model, B, T, torch.randn(B, M, *model.cfg.memory_shape), torch.full((B, M), 4))
    step = DecodeStep(model, model.caches(), windows.valid, compiled=True)
    step.pos[:] = T
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    shapes = [(rows, key_len, memory) for memory in (True, False) for rows in (1, 2, 3, 4)
              for key_len in (T + 1, 200, 384)]
    with torch.inference_mode():
        for shape in shapes:
            step(*shape)
        compiled = counters["stats"]["unique_graphs"] - before
        for shape in shapes:
            step(*shape)
        got = step(1, 384, memory=False).clone()  # one row, run in the 2-row bucket
        model.use_caches(step.caches)
        want = model.decode(step.tokens[:1], step.pos[:1], key_len=384)
    model.clear_caches()
    assert compiled == 2, f"{compiled} compilations for {len(shapes)} shapes"
    assert counters["stats"]["unique_graphs"] - before == compiled, "a shape seen before compiled again"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_window_retrieval_begun_a_step_early_is_taken_not_repeated(make_model):
    """`prefetch` begins a window's retrieval on the pool a step before `before_tokens` needs it (the query, the
    window before, is complete then): the early result is taken, not fetched again; a stale one (another index,
    a cleared row) is dropped and the window fetched anew; without a pool nothing begins early."""
    from concurrent.futures import ThreadPoolExecutor

    model = make_model()
    cfg = model.cfg
    calls, fail, hold = [], set(), set()
    started, gate, finished = threading.Event(), threading.Event(), threading.Event()
    memories = torch.randn(3, cfg.refs_per_window, *cfg.memory_shape)

    def retrieve(row, query):
        calls.append((row, tuple(query)))
        if row in fail:
            raise RuntimeError("retriever down")
        if row in hold:  # still running when its row ends
            hold.discard(row)
            started.set()
            gate.wait(10)
            finished.set()
        return Retrieved(memories[row], torch.tensor([3, 1]), ids=[f"r{row}"])

    prompt_len = cfg.sink_len + 3
    index = next(i for i in range(prompt_len + cfg.window, cfg.max_seq_len) if cfg.starts_window(i))
    seq = torch.randint(5, cfg.vocab_size, (index + cfg.window,)).tolist()
    lo, hi = cfg.window_span(cfg.window_of(index) - 1)
    with ThreadPoolExecutor(2) as pool:
        windows = MemoryWindows(model, retrieve, 3, pool)
        windows.prefetch([(0, index, seq, prompt_len), (1, index - 1, seq, prompt_len)])  # row 1: no window starts
        windows.ahead[0][1].result()
        assert calls == [(0, tuple(seq[lo:hi]))]
        assert windows.before_tokens([(0, index, seq, prompt_len), (1, index - 1, seq, prompt_len)]) == {0: ["r0"]}
        assert len(calls) == 1 and not windows.ahead  # taken, not fetched again
        assert torch.equal(windows.current[0], memories[0]) and windows.n_valid[0].tolist() == [3, 1]

        windows.prefetch([(1, index, seq, prompt_len)])
        later = index + cfg.window  # the row reached another window first: the early result is stale
        assert windows.before_tokens([(1, later, seq + [7] * cfg.window, prompt_len)]) == {1: ["r1"]}
        windows.settle()  # the stale retrieval may still be running: let it finish before counting calls
        assert calls[-2:] in ([(1, tuple(seq[lo:hi])), (1, tuple((seq + [7] * cfg.window)[index:later]))],
                              [(1, tuple((seq + [7] * cfg.window)[index:later])), (1, tuple(seq[lo:hi]))])

        hold.add(2)
        windows.prefetch([(2, index, seq, prompt_len)])
        assert started.wait(10)
        windows.clear_row(2)  # the request ended; a new one in its slot must not read the old retrieval
        n_calls = len(calls)
        assert windows.before_tokens([(2, index, seq, prompt_len)]) == {2: ["r2"]} and len(calls) == n_calls + 1
        threading.Timer(0.05, gate.set).start()
        windows.settle()  # before a graph capture: the dropped retrieval has finished
        assert finished.is_set() and not windows.dropped

        fail.add(0)  # a failure begun early comes back as the row's exception
        windows.prefetch([(0, index, seq, prompt_len)])
        error = windows.before_tokens([(0, index, seq, prompt_len)])[0]
        assert isinstance(error, RuntimeError) and "retriever down" in str(error)

    serial = MemoryWindows(model, retrieve, 3)
    n_calls = len(calls)
    serial.prefetch([(1, index, seq, prompt_len)])
    assert len(calls) == n_calls and not serial.ahead


def test_windows_that_fall_due_together_are_one_retrieve_many_call(make_model):
    """With `retrieve_many`, the rows that start a window in one step are one call (begun a step early on the pool,
    or when due without one); each row takes its own result, and one row's failure is that row's alone."""
    from concurrent.futures import ThreadPoolExecutor

    model = make_model()
    cfg = model.cfg
    calls = []
    memories = torch.randn(3, cfg.refs_per_window, *cfg.memory_shape)

    def retrieve_many(asks):
        calls.append([row for row, _ in asks])
        return [RuntimeError("retriever down") if row == 2 else
                Retrieved(memories[row], torch.tensor([3, 1]), ids=[f"r{row}"]) for row, _ in asks]

    prompt_len = cfg.sink_len + 3
    index = next(i for i in range(prompt_len + cfg.window, cfg.max_seq_len) if cfg.starts_window(i))
    seq = torch.randint(5, cfg.vocab_size, (index + cfg.window,)).tolist()
    rows = [(row, index, seq, prompt_len) for row in range(3)]
    with ThreadPoolExecutor(2) as pool:
        windows = MemoryWindows(model, None, 3, pool, retrieve_many)
        windows.prefetch(rows)
        done = windows.before_tokens(rows)
    assert calls == [[0, 1, 2]]
    assert done[0] == ["r0"] and done[1] == ["r1"] and isinstance(done[2], RuntimeError)
    assert torch.equal(windows.current[1], memories[1]) and windows.n_valid[0].tolist() == [3, 1]

    serial = MemoryWindows(model, None, 3, None, retrieve_many)
    serial.prefetch(rows)
    assert len(calls) == 1  # no pool: nothing begins early
    assert serial.before_tokens(rows[:2]) == {0: ["r0"], 1: ["r1"]} and calls[-1] == [0, 1]

    def down(asks):
        raise ConnectionError("retriever unreachable")

    failing = MemoryWindows(model, None, 3, None, down)
    assert all(isinstance(e, ConnectionError) for e in failing.before_tokens(rows).values())
