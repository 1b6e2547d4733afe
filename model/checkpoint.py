"""Checkpoint I/O: safetensors weights + config.json + tokenizer.json in one folder, written atomically.

Weight names follow Hugging Face Llama (minus its `model.` prefix), so `load_hf_llama` maps a Llama-family
checkpoint in by renaming only. Beside tokenizer.json sit tokenizer_config.json and special_tokens_map.json, so
`transformers.AutoTokenizer.from_pretrained(checkpoint)` loads the same tokenizer (evaluation harnesses need it to
split context from continuation); they are written by hand, keeping this package free of `transformers`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.tokenizer import SPECIAL_TOKENS, Tokenizer
from model.transformer import Transformer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)


def hf_tokenizer_files(tokenizer: Tokenizer, max_len: int) -> dict[str, dict]:
    """The Hugging Face side files for tokenizer.json: a fast tokenizer with our special tokens, no BOS added
    (the model's sink is added by `Tokenizer.context_ids`, not by the tokenizer), and decoding that keeps spaces
    as they are (so decode(encode(text)) == text, as with `Tokenizer`)."""
    pad, unk, bos, eos, ref = SPECIAL_TOKENS
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad,
               "additional_special_tokens": [ref]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **special}
    return {TOKENIZER_CONFIG: config, SPECIAL_TOKENS_MAP: special}


def save_checkpoint(path: str | Path, model: Transformer, tokenizer: Tokenizer | None = None,
                    meta: dict | None = None) -> Path:
    """Write to a sibling temp folder, then rename: a reader never sees half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps({"model": model.cfg.to_dict(), "meta": meta or {}}, indent=2))
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER)
        for name, data in hf_tokenizer_files(tokenizer, model.cfg.max_seq_len).items():
            (tmp / name).write_text(json.dumps(data, indent=2))
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def load_config(path: str | Path) -> ModelConfig:
    data = json.loads((Path(path) / CONFIG).read_text())
    return ModelConfig.from_dict(data["model"])


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer | None]:
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not a memory3 checkpoint (needs {WEIGHTS} and {CONFIG})")
    cfg = load_config(path)
    with torch.device("meta"):  # no random init of weights about to be replaced (minutes for 2.4B on a CPU)
        model = Transformer(cfg)
    state = {k: v.to(dtype) for k, v in load_file(str(path / WEIGHTS), device=str(device)).items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:  # assign gives each name its own Parameter: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    tokenizer = Tokenizer.load(path / TOKENIZER) if (path / TOKENIZER).is_file() else None
    return model.eval(), tokenizer


def config_from_hf(hf: dict, **memory_overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face Llama config.json; the first half of the layers become memory layers."""
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    if head_dim * n_head != hf["hidden_size"]:
        raise ValueError("hidden_size must equal num_attention_heads * head_dim")
    fields = dict(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads", n_head), head_dim=head_dim, mlp_hidden=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False),
        max_seq_len=hf.get("max_position_embeddings", 2048), n_mem_layer=hf["num_hidden_layers"] // 2,
    )
    fields.update(memory_overrides)
    return ModelConfig(**fields)


def load_hf_llama(path: str | Path, **memory_overrides) -> Transformer:
    """Load a Llama-family Hugging Face checkpoint folder (config.json + *.safetensors) by name mapping."""
    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), **memory_overrides)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the Llama layout: missing={missing} unexpected={unexpected}")
    return model.eval()
