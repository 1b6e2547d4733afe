"""Byte-level BPE tokenizer trained with Hugging Face `tokenizers`, saved beside each checkpoint.

Byte-level so that any UTF-8 text encodes without unknown tokens. The special `<ref>` token follows `<s>` to
form the sink that stands for the paper's "<s>Reference:" BOS (§3.2).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<ref>"]


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer):
        self.tk = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.ref_id = (ids[t] for t in SPECIAL_TOKENS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        tk = HFTokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(texts, trainer)
        return cls(tk)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path)))

    @classmethod
    def from_str(cls, data: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str())

    def to_str(self) -> str:
        return self.tk.to_str()

    @property
    def sha256(self) -> str:
        """Identifies the vocabulary: a memory bank is valid only for the tokenizer that wrote it."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    @property
    def sink_ids(self) -> list[int]:
        return [self.bos_id, self.ref_id]

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def context_ids(self, text: str) -> list[int]:
        """A model sequence: sink, then the context with its own `<s>` separator (paper §3.2)."""
        return self.sink_ids + [self.bos_id] + self.encode(text)
