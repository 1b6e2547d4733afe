"""The bank's on-disk record format: one reference's sparse memory as one fixed-size record (paper §3.1, §3.3).

Format (docs/bank-format.md): `manifest.json` is the commit point (bank/manifest.py); `shards/<name>.mem` hold
fixed-size records (8-byte header + one reference's memory as bf16 or VQ codes), so any reference is one ranged
read at `row * record_bytes` (np.memmap locally, `storage.read_range` on S3); `shards/<name>.parquet` hold the
text side (id, doc_id, text, tokens, n_valid, embedding, metadata); `shards/<name>.json` mark a shard complete.
"""
from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from bank import storage
from model.config import ModelConfig
from model.quantizer import MemoryQuantizer

FORMAT, VERSION = "memory3-bank", 1
MANIFEST, QUANTIZER, ERRORS, SHARDS = "manifest.json", "quantizer.faiss", "errors.jsonl", "shards"
HEADER_BYTES = 8  # uint32 n_valid, uint32 crc32 of the payload (little-endian)
WEIGHTS_FILE = "model.safetensors"


class BankError(ValueError):
    """A bank that cannot be used as it is: corrupt shard, wrong model, bad manifest. The message names the part."""


# --- checksums -------------------------------------------------------------------------------------------------

def file_sha256(uri: str, chunk: int = 8 << 20) -> tuple[str, int]:
    """(sha256 hex, size) of a local or remote file, streamed."""
    fs, path = storage.filesystem(uri)
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def weights_sha256(checkpoint_dir: str) -> str:
    """sha256 of the checkpoint's model.safetensors: identifies the weights that wrote a bank (paper App. A
    Remark 9: memories must be rebuilt when the model changes)."""
    uri = storage.join(str(checkpoint_dir), WEIGHTS_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{checkpoint_dir} has no {WEIGHTS_FILE}")
    return file_sha256(uri)[0]


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- record layout ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordLayout:
    """One reference = HEADER_BYTES + vectors * code_size bytes; vectors = L_mem * 2 * Hkv * k, each head_dim wide,
    stored as bf16 (code_size = 2 * head_dim) or as the quantizer's codes (paper App. B: 14 B per vector)."""

    memory_shape: tuple[int, ...]
    codec: str  # "bfloat16" | "faiss"
    code_size: int

    @classmethod
    def create(cls, cfg: ModelConfig, quantizer: MemoryQuantizer | None) -> "RecordLayout":
        if quantizer is None:
            return cls(tuple(cfg.memory_shape), "bfloat16", 2 * cfg.head_dim)
        return cls(tuple(cfg.memory_shape), "faiss", quantizer.code_size)

    @property
    def vectors(self) -> int:
        return math.prod(self.memory_shape[:-1])

    @property
    def payload_bytes(self) -> int:
        return self.vectors * self.code_size

    @property
    def record_bytes(self) -> int:
        return HEADER_BYTES + self.payload_bytes

    def to_dict(self) -> dict:
        return {"memory_shape": list(self.memory_shape), "codec": self.codec, "code_size": self.code_size,
                "header_bytes": HEADER_BYTES, "record_bytes": self.record_bytes, "byte_order": "little"}

    @classmethod
    def from_dict(cls, d: dict) -> "RecordLayout":
        layout = cls(tuple(d["memory_shape"]), d["codec"], int(d["code_size"]))
        if layout.record_bytes != d["record_bytes"] or d.get("header_bytes", HEADER_BYTES) != HEADER_BYTES:
            raise BankError(f"manifest record layout is inconsistent: {d}")
        return layout

    def pack(self, memories: Tensor, n_valid: Tensor, quantizer: MemoryQuantizer | None) -> np.ndarray:
        """memories (N, L_mem, 2, Hkv, k, D), n_valid (N,) -> records (N, record_bytes) uint8."""
        n = memories.shape[0]
        if tuple(memories.shape[1:]) != self.memory_shape:
            raise ValueError(f"memories of shape {tuple(memories.shape[1:])} do not fit layout {self.memory_shape}")
        if self.codec == "bfloat16":
            payload = memories.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy()
        else:
            payload = quantizer.encode(memories.detach().float().cpu())
        return self.pack_payload(payload.view(np.uint8).reshape(n, -1), n_valid)

    def pack_payload(self, payload: np.ndarray, n_valid: Tensor) -> np.ndarray:
        """payload (N, payload_bytes) uint8 (bf16 bytes or VQ codes, e.g. quantized on the encoder's GPU) and
        n_valid (N,) -> records (N, record_bytes): the header (n_valid, CRC32 of the payload) in front."""
        n = payload.shape[0]
        if payload.shape[1:] != (self.payload_bytes,):
            raise ValueError(f"payload of {payload.shape[1:]} bytes per record does not fit layout "
                             f"({self.payload_bytes})")
        records = np.empty((n, self.record_bytes), dtype=np.uint8)
        records[:, HEADER_BYTES:] = payload
        header = records[:, :HEADER_BYTES].view("<u4")  # (n, 2)
        header[:, 0] = n_valid.cpu().numpy().astype(np.uint32)
        header[:, 1] = [zlib.crc32(p) for p in payload]
        return records

    def split(self, records: np.ndarray) -> tuple[Tensor, Tensor]:
        """records (N, record_bytes) -> payload (N, payload_bytes) uint8 (bf16 bytes or VQ codes, as stored) and
        n_valid (N,) int64: the compact form a host cache keeps."""
        n_valid = torch.from_numpy(np.ascontiguousarray(records[:, :4]).view("<u4")[:, 0].astype(np.int64))
        return torch.from_numpy(np.ascontiguousarray(records[:, HEADER_BYTES:])), n_valid

    def decode(self, records: np.ndarray, quantizer: MemoryQuantizer | None, device="cpu") -> tuple[Tensor, Tensor]:
        """records (N, record_bytes) -> memories (N, *memory_shape) on `device` (bf16 as stored, or float32 from
        the codes) and n_valid (N,) int64 on the host."""
        payload, n_valid = self.split(records)
        return self.decode_payload(payload, n_valid, quantizer, device), n_valid

    def decode_payload(self, payload: Tensor, n_valid: Tensor, quantizer: MemoryQuantizer | None,
                       device="cpu") -> Tensor:
        """payload (N, payload_bytes) uint8 -> memories on `device`: the bytes travel, then are viewed as bf16 or
        dequantized there (one batched call: torch on a GPU, FAISS on the host; model/quantizer.py)."""
        n = payload.shape[0]
        payload = payload.to(device, non_blocking=True)
        if self.codec == "bfloat16":
            return payload.view(torch.bfloat16).reshape(n, *self.memory_shape)
        memories = quantizer.decode(payload.reshape(n, *self.memory_shape[:-1], self.code_size), device)
        k = self.memory_shape[3]
        slot_ok = torch.arange(k, device=memories.device) < n_valid.to(memories.device)[:, None]
        return memories * slot_ok[:, None, None, None, :, None]  # VQ turns zero padding into noise; zero it again


def check_records(records: np.ndarray, rows: Sequence[int], where: Sequence[str]) -> None:
    """Compare each record's crc32 with its header: a flipped byte is caught on the read path too."""
    crcs = np.ascontiguousarray(records[:, 4:HEADER_BYTES]).view("<u4")[:, 0]
    for i, rec in enumerate(records):
        if zlib.crc32(rec[HEADER_BYTES:]) != crcs[i]:
            raise BankError(f"corrupt record: row {rows[i]} in shard {where[i]} fails its crc32 check; "
                            f"run `memory3 bank verify bank=...`")
