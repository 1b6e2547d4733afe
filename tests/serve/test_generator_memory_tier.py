"""The generator's own memory tier (`memory.generator_tier`) against the MemoryStore deployment it replaces on GPUs:
the same memories, so the same tokens. The deployment classes run in-process on a real bank and a real FAISS index;
only the handle's call shape (`.remote(...).result()`) is stood in for, as it needs a cluster."""
from __future__ import annotations

import asyncio
import shutil
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from bank.edits import delete_references
from bank.manifest import read_manifest
from serve.app import load_settings
from serve.bank_version import BankVersion
from serve.generator import Generator
from serve.memory_store import MemoryStoreDeployment
from serve.retriever import RetrieverDeployment

PROMPT = "Osaka is a city in Japan. It has a population of about 548 thousand people. Osaka is in"


class InProcess:
    """`handle.method.remote(*args).result(timeout_s=...)` over an object in this process."""

    def __init__(self, target, **methods):
        self.target, self.methods = target, methods

    def __getattr__(self, name):
        fn = self.methods.get(name) or getattr(self.target, name)
        return SimpleNamespace(remote=lambda *args: SimpleNamespace(result=lambda timeout_s=None: fn(*args)))


def decode(generator: Generator, bank_version: str | None = None) -> tuple[list[int], list[list[str]]]:
    """Greedy tokens and each window's retrieved ids of one request with memory."""
    job = {"prompt": generator.tokenizer.encode(PROMPT), "max_tokens": 80, "temperature": 0.0, "top_p": 1.0,
           "memory": True, "bank_version": bank_version}

    async def run() -> list[dict]:
        return [e async for events in generator.generate(job) for e in events]

    events = asyncio.run(run())
    assert not [e for e in events if e["type"] == "error"], events
    return [e["token"] for e in events if e["type"] == "token"], \
        [[m["id"] for m in e["memories"]] for e in events if e["type"] == "retrieval"]


@pytest.fixture(scope="module")
def parts(tiny_checkpoint, tiny_bank, tmp_path_factory):
    bank = str(shutil.copytree(tiny_bank, tmp_path_factory.mktemp("tier") / "bank"))
    cfg = OmegaConf.to_container(load_settings({"checkpoint": tiny_checkpoint, "bank": bank}), resolve=True)
    found = RetrieverDeployment.func_or_class(bank, cfg["retrieval"])
    retriever = InProcess(found, search_batch=lambda queries, k, versions: found.search_many(
        queries, k, [BankVersion.parse(v) for v in versions]))
    store = MemoryStoreDeployment.func_or_class(bank, cfg["memory"])
    made = []

    def generator(tier: bool | None) -> Generator:
        made.append(Generator.func_or_class(tiny_checkpoint, {**cfg["decoding"], "seed": 0}, retriever,
                                            InProcess(store), bank, {**cfg["memory"], "generator_tier": tier}))
        return made[-1]

    yield SimpleNamespace(bank=bank, store=store, generator=generator)
    for g in made:
        g.engine.stop()


def test_the_generator_tier_reads_what_the_memory_store_serves(parts):
    assert parts.generator(None).memories is None  # default on a CPU replica: the MemoryStore deployment
    through_store = parts.generator(False)
    own_tier = parts.generator(True)
    fetched = parts.store.stats()["rows_requested"]
    tokens, retrieved = decode(through_store)
    assert retrieved and all(retrieved), "the request never read a memory"
    assert parts.store.stats()["rows_requested"] > fetched

    assert decode(own_tier) == (tokens, retrieved)
    stats = own_tier.memories.stats()
    assert stats["device"] == "cpu" and stats["rows_requested"] == sum(len(ids) for ids in retrieved)

    # a deletion is a new bank version: the tier re-opens the bank and never serves the deleted reference again
    gone = retrieved[0][0]
    delete_references(parts.bank, [gone])
    version = str(BankVersion.of(read_manifest(parts.bank)))
    tokens_after, retrieved_after = decode(own_tier, version)
    assert gone not in {i for ids in retrieved_after for i in ids}
    assert own_tier.memories.version == BankVersion.parse(version)
    assert decode(through_store, version) == (tokens_after, retrieved_after)


def test_the_event_inbox_hands_over_every_event_in_order_and_gathers_them():
    """The engine thread's events reach the replica's loop whole and in order, several to a take when they pile up
    (one stream item each take), and a take waits for at least one."""
    import threading

    from serve.generator import EventInbox

    async def main() -> tuple[list[dict], int]:
        inbox = EventInbox(asyncio.get_running_loop())

        def engine():
            for i in range(3000):
                inbox.put({"type": "token", "token": i})
            inbox.put({"type": "finish"})

        thread = threading.Thread(target=engine)
        thread.start()
        got, takes = [], 0
        while not got or got[-1]["type"] != "finish":
            got += await inbox.take()
            takes += 1
            await asyncio.sleep(0.002)  # a stream interval
        thread.join()
        return got, takes

    got, takes = asyncio.run(main())
    assert [e["token"] for e in got[:-1]] == list(range(3000)) and got[-1] == {"type": "finish"}
    assert takes < len(got) / 10, f"{takes} takes for {len(got)} events"


def test_tokens_gather_for_the_stream_interval_but_the_end_leaves_at_once():
    """`gather` lets later tokens wait up to the interval; a request's end cuts it short (its client, and in a
    closed loop its next request, waits for the end)."""
    import threading
    import time

    from serve.generator import EventInbox

    async def main() -> tuple[float, float, list[dict]]:
        inbox = EventInbox(asyncio.get_running_loop())
        inbox.put({"type": "token", "token": 1})
        await inbox.take()
        began = time.perf_counter()
        await inbox.gather(0.05)  # no end: the whole interval
        interval = time.perf_counter() - began
        threading.Timer(0.05, lambda: (inbox.put({"type": "token", "token": 2}), inbox.put({"type": "finish"}))).start()
        began = time.perf_counter()
        await inbox.gather(30.0)
        return interval, time.perf_counter() - began, await inbox.take()

    interval, cut_short, rest = asyncio.run(main())
    assert interval >= 0.05
    assert cut_short < 10.0, "the end waited for the whole interval"
    assert rest == [{"type": "token", "token": 2}, {"type": "finish"}]
