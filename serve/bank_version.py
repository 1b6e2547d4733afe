"""Which state of a live bank a replica has loaded, so admin writes are seen by the very next request.

A bank only grows: appends add rows, deletes add tombstones, nothing is rewritten. So (rows, tombstones) from the
manifest orders bank states. The bank writer (one replica) reports its version with every request the ingress
routes; a retriever or memory-store replica that has loaded an older state re-opens the bank before answering.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BankVersion:
    references: int
    deleted: int

    @classmethod
    def of(cls, manifest: dict) -> "BankVersion":
        return cls(int(manifest["references"]), len(manifest.get("tombstones", ())))

    @classmethod
    def parse(cls, text: str | None) -> "BankVersion | None":
        if not text:
            return None
        references, deleted = text.split(".")
        return cls(int(references), int(deleted))

    def __str__(self) -> str:
        return f"{self.references}.{self.deleted}"

    def is_behind(self, wanted: "BankVersion | None") -> bool:
        return wanted is not None and (wanted.references > self.references or wanted.deleted > self.deleted)
