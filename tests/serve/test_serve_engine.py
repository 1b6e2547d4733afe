"""The continuous-batching engine decodes exactly like model.generate (the paper's schedule), slot reuse included."""
from __future__ import annotations

import threading

import pytest
import torch

from model.config import ModelConfig
from model.generate import Retrieved, generate
from model.transformer import Transformer
from serve.engine import DecodeEngine, DecodeRequest

CFG = dict(vocab_size=97, n_layer=3, n_head=4, n_kv_head=2, head_dim=8, mlp_hidden=48, max_seq_len=120,
           n_mem_layer=2, reference_len=16, mem_tokens=4, window=8, refs_per_window=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CFG)).to(torch.float64).eval()


@pytest.fixture(scope="module")
def bank(model):
    """Ten fixed memories; a query picks two of them by its content, so a wrong query shows up as wrong ids."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, *model.cfg.memory_shape, generator=g, dtype=torch.float64)


def make_retrieve(bank, fail_after: int | None = None):
    calls = []

    def retrieve(query: list[int]) -> Retrieved:
        calls.append(list(query))
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("retriever down")
        a, b = sum(query) % 10, (7 * len(query) + query[0]) % 10
        ids = [a, b] if a != b else [a]
        return Retrieved(bank[ids], torch.tensor([4, 3][:len(ids)]), ids=ids)

    return retrieve


def reference(model, prompt, max_new, retrieve):
    """model.generate on one sequence: tokens and (window, ids) retrieval events."""
    tokens, events = [], []
    for step in generate(model, [prompt], max_new, retrieve=(lambda row, q: retrieve(q)) if retrieve else None,
                         stop_ids=set()):
        events += [(w, list(ids)) for _, w, ids in step.retrievals]
        if step.tokens[0] is not None:
            tokens.append(step.tokens[0])
    return tokens, events


class Collector:
    def __init__(self):
        self.tokens, self.retrievals, self.end = [], [], None
        self.done = threading.Event()

    def __call__(self, event: dict) -> None:
        if event["type"] == "token":
            self.tokens.append(event["token"])
        elif event["type"] == "retrieval":
            self.retrievals.append((event["window"], event["ids"]))
        else:
            self.end = event
            self.done.set()


def prompt_of(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2, 4, 2] + torch.randint(5, 97, (length - 3,), generator=g).tolist()


def test_engine_matches_generate_with_slot_reuse(model, bank):
    engine = DecodeEngine(model, max_batch=3, seed=0)
    try:
        jobs = [(prompt_of(i, 5 + 7 * i), 6 + 5 * i, i != 2) for i in range(6)]  # request 2 decodes without memory
        collectors = []
        for prompt, max_new, with_memory in jobs:
            c = Collector()
            engine.submit(DecodeRequest(prompt, max_new, retrieve=make_retrieve(bank) if with_memory else None,
                                        emit=c))
            collectors.append(c)
        for c in collectors:
            assert c.done.wait(60)
        n_retrievals = []
        for (prompt, max_new, with_memory), c in zip(jobs, collectors):
            tokens, events = reference(model, prompt, max_new, make_retrieve(bank) if with_memory else None)
            assert c.end == {"type": "finish", "reason": "length"}
            assert c.tokens == tokens
            assert c.retrievals == events
            n_retrievals.append(len(events))
        assert n_retrievals[2] == 0 and max(n_retrievals) >= 5  # windows of 8 tokens: prompt and decode retrievals
        stats = engine.stats()
        assert stats["completed"] == 6 and stats["active"] == 0 and stats["steps"] < sum(j[1] for j in jobs)
        # where each request's first token waited: every request timed once, its wait inside its time to it
        assert stats["queue_s"]["n"] == stats["first_token_s"]["n"] == 6
        assert stats["prefill_s"]["n"] == stats["prefills"]
        assert 0 <= stats["queue_s"]["max"] <= stats["first_token_s"]["max"]
        engine.reset_timings()
        assert engine.stats()["first_token_s"] == {"n": 0, "p50": None, "p90": None, "max": None}
    finally:
        engine.stop()


def test_cancel_and_failure_free_their_slot_only(model, bank):
    engine = DecodeEngine(model, max_batch=2, seed=0)
    try:
        slow, failing, healthy = Collector(), Collector(), Collector()
        long_request = DecodeRequest(prompt_of(10, 9), 100, emit=slow)
        engine.submit(long_request)
        engine.submit(DecodeRequest(prompt_of(11, 9), 40, retrieve=make_retrieve(bank, fail_after=2), emit=failing))
        assert failing.done.wait(60)
        assert failing.end["type"] == "error" and "retriever down" in failing.end["message"]
        long_request.cancel()
        prompt = prompt_of(12, 12)
        engine.submit(DecodeRequest(prompt, 20, retrieve=make_retrieve(bank), emit=healthy))
        assert healthy.done.wait(60)
        assert healthy.tokens == reference(model, prompt, 20, make_retrieve(bank))[0]
        assert not slow.done.is_set() and len(slow.tokens) < 100
        stats = engine.stats()
        assert stats["active"] == 0 and stats["cancelled"] == 1 and stats["failed"] == 1
    finally:
        engine.stop()


def test_submit_rejects_a_request_longer_than_the_context(model):
    engine = DecodeEngine(model, max_batch=1)
    try:
        with pytest.raises(ValueError, match="max_seq_len"):
            engine.submit(DecodeRequest(prompt_of(0, 100), 21))
    finally:
        engine.stop()


def test_a_failing_prompt_retrieval_fails_only_its_request(model, bank):
    engine = DecodeEngine(model, max_batch=4, seed=0)
    try:
        prompts = [prompt_of(20 + i, 10 + 3 * i) for i in range(3)]
        collectors = [Collector() for _ in prompts]
        with engine.wakeup:  # hold the engine so the three are admitted (and prefilled) as one batch
            for i, (p, c) in enumerate(zip(prompts, collectors)):
                retrieve = make_retrieve(bank, fail_after=0 if i == 1 else None)
                engine.submit(DecodeRequest(p, 12, retrieve=retrieve, emit=c))
        for c in collectors:
            assert c.done.wait(60)
        assert collectors[1].end["type"] == "error" and "retriever down" in collectors[1].end["message"]
        for i in (0, 2):
            assert collectors[i].tokens == reference(model, prompts[i], 12, make_retrieve(bank))[0]
    finally:
        engine.stop()


def test_a_waiting_requests_prompt_retrieval_does_not_hold_up_the_batch(model, bank):
    """A request's prompt windows are retrieved while it waits, not in its prefill: the batch decodes to the end
    while that retrieval is held, and the request is then prefilled with what came back (generate's tokens)."""
    release = threading.Event()
    plain = make_retrieve(bank)

    def held(query):
        assert release.wait(30), "never released"
        return plain(query)

    engine = DecodeEngine(model, max_batch=2, seed=0)
    try:
        running, waiting = Collector(), Collector()
        engine.submit(DecodeRequest(prompt_of(90, 9), 60, emit=running))
        prompt = prompt_of(91, 12)
        engine.submit(DecodeRequest(prompt, 12, retrieve=held, emit=waiting))
        assert running.done.wait(20) and running.end == {"type": "finish", "reason": "length"}
        assert len(running.tokens) == 60 and not waiting.tokens and not waiting.done.is_set()
        release.set()
        assert waiting.done.wait(60)
        assert waiting.tokens == reference(model, prompt, 12, make_retrieve(bank))[0]
    finally:
        release.set()
        engine.stop()


@pytest.mark.parametrize("concurrency", [0, 1])
def test_retrievals_that_fall_due_together_run_at_once(model, bank, concurrency):
    """A prefill's windows and the rows that start a window in the same step are retrieved concurrently (a served
    retriever batches concurrent queries into one search): here each retrieval waits until all three rows'
    retrievals are in flight. Serial (`retrieval_concurrency=1`) the first one waits alone and every request fails,
    which shows the check can fail."""
    barrier = threading.Barrier(3, timeout=10 if concurrency != 1 else 1)
    plain = make_retrieve(bank)

    def together(query):
        barrier.wait()
        return plain(query)

    prompts = [prompt_of(30 + i, 14) for i in range(3)]  # equal lengths: the rows start windows in the same steps
    collectors = [Collector() for _ in prompts]
    engine = DecodeEngine(model, max_batch=3, seed=0, retrieval_concurrency=concurrency)
    try:
        with engine.wakeup:  # admitted (and prefilled) as one batch
            for p, c in zip(prompts, collectors):
                engine.submit(DecodeRequest(p, 20, retrieve=together, emit=c))
        for c in collectors:
            assert c.done.wait(60)
    finally:
        engine.stop()
    if concurrency == 1:
        assert all(c.end["type"] == "error" for c in collectors), [c.end for c in collectors]
        return
    for p, c in zip(prompts, collectors):
        assert c.end == {"type": "finish", "reason": "length"}
        tokens, events = reference(model, p, 20, make_retrieve(bank))
        assert c.tokens == tokens and c.retrievals == events
        assert len(events) >= 3  # prompt windows and decode windows, every one through the barrier


class LogprobCollector(Collector):
    def __init__(self):
        super().__init__()
        self.logprobs, self.tops, self.prompt = [], [], None

    def __call__(self, event: dict) -> None:
        if event["type"] == "token":
            self.logprobs.append(event.get("logprob"))
            self.tops.append(event.get("top"))
        elif event["type"] == "prompt_logprobs":
            self.prompt = event
        super().__call__(event)


def run_requests(model, requests: list[DecodeRequest], max_batch: int = 4) -> None:
    """Submit all at once (so they share batches), wait for every one."""
    engine = DecodeEngine(model, max_batch=max_batch, seed=0)
    try:
        with engine.wakeup:
            for r in requests:
                engine.submit(r)
        for r in requests:
            assert r.emit.done.wait(60)
    finally:
        engine.stop()


def constant_retrieve(bank):
    """The same memories for every query: decoding and scoring a text then read the same memories everywhere."""
    return lambda query: Retrieved(bank[[3, 7]], torch.tensor([4, 2]), ids=[3, 7])


@pytest.mark.parametrize("memory", [True, False])
def test_logprobs_are_the_sampled_distribution_and_greedy_is_their_argmax(model, bank, memory):
    prompts = [prompt_of(30 + i, 6 + 9 * i) for i in range(3)]
    requests = [DecodeRequest(p, 14, retrieve=make_retrieve(bank) if memory else None, logprobs=3,
                              emit=LogprobCollector()) for p in prompts]
    run_requests(model, requests)
    for prompt, r in zip(prompts, requests):
        c = r.emit
        want_logits = [step.logits[0] for step in generate(
            model, [prompt], 14, retrieve=(lambda row, q: make_retrieve(bank)(q)) if memory else None)]
        assert c.tokens == reference(model, prompt, 14, make_retrieve(bank) if memory else None)[0]
        for token, logprob, top, logits in zip(c.tokens, c.logprobs, c.tops, want_logits):
            assert len(top) == 3 and top[0][0] == token and top[0][1] == pytest.approx(logprob, abs=1e-12)
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-5)  # float32 logits


@pytest.mark.parametrize("memory", [True, False])
def test_scoring_a_text_gives_the_logprobs_decoding_it_gave(model, bank, memory):
    """Echo scoring (prefill) and decoding are one path: the prompt logprobs of prompt + generated tokens equal
    the logprobs reported while generating them, with and without memory."""
    retrieve = constant_retrieve(bank) if memory else None
    prompt = prompt_of(40, 11)
    decoded = DecodeRequest(prompt, 20, retrieve=retrieve, logprobs=0, emit=LogprobCollector())  # crosses windows
    run_requests(model, [decoded])
    scored = DecodeRequest(prompt + decoded.emit.tokens, 0, retrieve=retrieve, logprobs=2, prompt_logprobs=True,
                           emit=LogprobCollector())
    plain = DecodeRequest(prompt + decoded.emit.tokens, 0, logprobs=2, prompt_logprobs=True, emit=LogprobCollector())
    run_requests(model, [scored, plain])
    event = scored.emit.prompt
    assert scored.emit.end == {"type": "finish", "reason": "length"} and scored.emit.tokens == []
    assert len(event["logprobs"]) == len(prompt) + 20 - 1 and all(len(t) == 2 for t in event["top"])
    torch.testing.assert_close(event["logprobs"][len(prompt) - 1:], decoded.emit.logprobs, atol=1e-5, rtol=0)
    memory_changed = plain.emit.prompt["logprobs"] != event["logprobs"]
    assert memory_changed == memory  # memory_mode applies to scoring


def test_a_seeded_request_samples_the_same_whatever_the_batch(model):
    def seeded(seed):
        return DecodeRequest(prompt_of(50, 9), 16, temperature=1.0, seed=seed, emit=Collector())

    alone, crowded, other = seeded(7), seeded(7), seeded(8)
    noise = [DecodeRequest(prompt_of(51 + i, 7), 10, temperature=1.0, emit=Collector()) for i in range(2)]
    run_requests(model, [alone])
    run_requests(model, noise[:1] + [crowded] + noise[1:] + [other])
    assert alone.emit.tokens == crowded.emit.tokens and len(alone.emit.tokens) == 16
    assert other.emit.tokens != alone.emit.tokens


def test_zero_new_tokens_ends_after_prefill(model):
    request = DecodeRequest(prompt_of(60, 8), 0, emit=Collector())
    run_requests(model, [request])
    assert request.emit.end == {"type": "finish", "reason": "length"} and request.emit.tokens == []


def test_requests_submitted_together_share_one_prefill_and_the_counts_say_so(model):
    engine = DecodeEngine(model, max_batch=4, seed=0)
    try:
        together = [DecodeRequest(prompt_of(70 + i, 6 + i), 3, emit=Collector()) for i in range(3)]
        engine.submit(*together)
        for r in together:
            assert r.emit.done.wait(60)
        later = DecodeRequest(prompt_of(80, 9), 3, emit=Collector())
        engine.submit(later)
        assert later.emit.done.wait(60)
        stats = engine.stats()
        assert (stats["prefills"], stats["prefilled"]) == (2, 4)
    finally:
        engine.stop()


def test_the_stats_show_each_step_and_the_collectors_full_passes_while_the_engine_runs(model):
    """A served request that stalls with the engine's own timings clean needs a cause: each decode step's wall time
    and the process's full collector passes (which stop every thread) are in `stats()`, and only while it runs."""
    import gc

    engine = DecodeEngine(model, max_batch=2, seed=0)
    try:
        request = DecodeRequest(prompt_of(90, 6), 5, emit=Collector())
        engine.submit(request)
        assert request.emit.done.wait(60)
        gc.collect()
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats["step_s"]["n"] >= 4 and stats["step_s"]["max"] > 0
    assert stats["gc_pause_s"]["n"] >= 1
    gc.collect()
    assert engine.stats()["gc_pause_s"]["n"] == stats["gc_pause_s"]["n"], "still observing after stop"


def test_retrievals_that_fall_due_together_go_to_retrieve_many_as_one_call(model, bank):
    """With the server's retrieve_many, a prefill's windows (of every request in it) are one call and the rows that
    start a window in the same step are one call; the tokens and retrieval events are generate's. A request whose
    own retrieval fails in a batch fails alone; a request without memory is never asked for."""
    calls = []

    def retrieve_many(asks):
        calls.append(len(asks))
        out = []
        for fn, query in asks:
            try:
                out.append(fn(query))
            except RuntimeError as e:
                out.append(e)
        return out

    prompts = [prompt_of(40 + i, 14) for i in range(4)]  # equal lengths: windows start in the same steps
    retrieves = [make_retrieve(bank), make_retrieve(bank), None, make_retrieve(bank, fail_after=2)]
    collectors = [Collector() for _ in prompts]
    engine = DecodeEngine(model, max_batch=4, seed=0, retrieve_many=retrieve_many)
    try:
        with engine.wakeup:  # admitted (and prefilled) as one batch
            for p, fn, c in zip(prompts, retrieves, collectors):
                engine.submit(DecodeRequest(p, 20, retrieve=fn, emit=c))
        for c in collectors:
            assert c.done.wait(60)
    finally:
        engine.stop()
    n_prompt_windows = model.cfg.n_windows(len(prompts[0]))
    assert calls[0] == 3 * n_prompt_windows  # one call for the three memory requests' prompt windows
    # then one per window boundary for the rows that cross it together; request 3's first decode retrieval fails
    assert len(calls) >= 3 and calls[1] == 3 and all(n == 2 for n in calls[2:]), calls
    assert collectors[3].end["type"] == "error" and "retriever down" in collectors[3].end["message"]
    for p, fn, c in zip(prompts[:3], retrieves[:3], collectors[:3]):
        assert c.end == {"type": "finish", "reason": "length"}
        tokens, events = reference(model, p, 20, make_retrieve(bank) if fn else None)
        assert c.tokens == tokens and c.retrievals == events
