"""Which state of a live bank a replica has loaded, so admin writes are seen by the very next request.

Between compactions a bank only grows: appends add rows, deletes add tombstones, nothing is rewritten. A compaction
(bank/compact.py) rewrites shards without their deleted rows, renumbers the rows and increments the manifest's
`generation`. So (generation, rows, tombstones) orders bank states. The bank writer (one replica) reports its
version for every request the ingress routes (`CurrentVersion`: one call for the requests that wait together); a
retriever or memory-store replica that has loaded an older state re-opens the bank before answering. Rows from a
replica of another generation are matched by reference id.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BankVersion:
    generation: int
    references: int
    deleted: int

    @classmethod
    def of(cls, manifest: dict) -> "BankVersion":
        return cls(int(manifest.get("generation", 0)), int(manifest["references"]),
                   len(manifest.get("tombstones", ())))

    @classmethod
    def parse(cls, text: str | None) -> "BankVersion | None":
        if not text:
            return None
        generation, references, deleted = text.split(".")
        return cls(int(generation), int(references), int(deleted))

    def __str__(self) -> str:
        return f"{self.generation}.{self.references}.{self.deleted}"

    def is_behind(self, wanted: "BankVersion | None") -> bool:
        if wanted is None or wanted.generation < self.generation:
            return False
        return wanted.generation > self.generation or wanted.references > self.references or \
            wanted.deleted > self.deleted


class CurrentVersion:
    """The bank writer's version for requests that arrive together, from one call instead of one call each. The
    writer is a single replica that every memory request of every ingress replica asks, so its load would grow with
    the endpoint's traffic; coalesced, each ingress replica has at most one call on its way and one waiting (on 2
    CPU cores at concurrency 8: 16 calls for 40 requests; each request still waits about one round trip,
    BENCHMARKS.md). Read-after-write holds: a request only joins a call that has not begun, so its answer is read
    after the request arrived; requests that arrive while a call is on its way wait for the next one."""

    def __init__(self, ask: Callable[[], Awaitable[str]]):
        self.ask = ask
        self.lock = asyncio.Lock()
        self.next: asyncio.Future | None = None  # the call not yet begun, which an arriving request joins
        self.tasks: set[asyncio.Task] = set()
        self.calls = 0

    async def get(self) -> str:
        if self.next is None:
            self.next = asyncio.get_running_loop().create_future()
            self.next.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if all left
            task = asyncio.create_task(self._call(self.next))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await asyncio.shield(self.next)  # one request cancelled leaves the call to the others

    async def _call(self, result: asyncio.Future) -> None:
        async with self.lock:
            self.next = None  # from here on, arrivals need a call that begins after them
            self.calls += 1
            try:
                result.set_result(await self.ask())
            except Exception as e:
                result.set_exception(e)
