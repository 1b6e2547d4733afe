"""Incremental detokenization with stop strings, for streaming.

Byte-level BPE may end a step in the middle of a UTF-8 character, and a stop string may arrive split over several
tokens, so text is released only once it can no longer change or turn out to be the start of a stop string.
"""
from __future__ import annotations

from model.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""          # everything released so far
        self.stopped = False    # a stop string was found; text ends before it

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the newly released text."""
        if self.stopped or not ids:
            return ""
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids)
        start = max(len(self.text) - max((len(s) for s in self.stop), default=0), 0)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(full[:min(hits)])
        safe = len(full.rstrip("\ufffd"))  # an incomplete character decodes as U+FFFD until its last byte arrives
        held = max((k for s in self.stop for k in range(1, len(s)) if full[:safe].endswith(s[:k])), default=0)
        return self._release(full[:safe - held])

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids))

    def _release(self, upto: str) -> str:
        new = upto[len(self.text):] if len(upto) > len(self.text) else ""
        self.text += new
        return new
