"""OpenAI `logprobs` objects from the engine's logprob events.

The engine reports ids and numbers (serve/engine.py: `prompt_logprobs` and the `logprob`/`top` of each token); this
module names the tokens. A token's text is its own decoding, so a byte-level token that holds part of a UTF-8
character shows as U+FFFD, as with other byte-level BPE servers.

Completions (`logprobs: k`): {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"};
with `echo` the prompt's tokens come first. Chat (`logprobs: true`, `top_logprobs: k`):
{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from model.tokenizer import Tokenizer


@dataclass
class TokenLogprobs:
    """Scored tokens in order: id, logprob and the top alternatives as (id, logprob) pairs."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list] = field(default_factory=list)

    def add(self, token: int, logprob: float, top: list) -> None:
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.tops.append(top)

    def tail(self, n: int) -> "TokenLogprobs":
        """The last n tokens (the user's prompt, after the sink and any RAG references)."""
        start = len(self.ids) - n
        return TokenLogprobs(self.ids[start:], self.logprobs[start:], self.tops[start:])

    def __add__(self, other: "TokenLogprobs") -> "TokenLogprobs":
        return TokenLogprobs(self.ids + other.ids, self.logprobs + other.logprobs, self.tops + other.tops)


def completion_logprobs(tokenizer: Tokenizer, scored: TokenLogprobs, text_start: int) -> dict:
    """The completions object; text_start is where the first token's text begins in the choice's text."""
    tokens = [tokenizer.decode([i]) for i in scored.ids]
    offsets, at = [], text_start
    for token in tokens:
        offsets.append(at)
        at += len(token)
    tops = [{tokenizer.decode([i]): lp for i, lp in reversed(top)} for top in scored.tops]  # ties: the likelier
    return {"tokens": tokens, "token_logprobs": scored.logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, scored: TokenLogprobs) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(i, lp), "top_logprobs": [entry(t, v) for t, v in top]}
                        for i, lp, top in zip(scored.ids, scored.logprobs, scored.tops)]}
