"""Which state of a live bank a replica has loaded, so admin writes are seen by the very next request.

Between compactions a bank only grows: appends add rows, deletes add tombstones, nothing is rewritten. A compaction
(bank/compact.py) rewrites shards without their deleted rows, renumbers the rows and increments the manifest's
`generation`. So (generation, rows, tombstones) orders bank states. The bank writer (one replica) reports its
version with every request the ingress routes; a retriever or memory-store replica that has loaded an older state
re-opens the bank before answering. Rows from a replica of another generation are matched by reference id.
"""
from __future__ import annotations

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
