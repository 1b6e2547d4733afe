"""Checkpoints round-trip; a Hugging Face Llama checkpoint loads by name mapping and gives the same logits."""
import json

import pytest
import torch

from model.checkpoint import load_checkpoint, load_hf_llama, save_checkpoint
from model.tokenizer import Tokenizer



def test_logits_equal_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    for p in hf.parameters():  # random, not the init's all-ones norms
        p.copy_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_llama(tmp_path)
    idx = torch.randint(0, 101, (2, 19))
    input_pos = torch.arange(19).expand(2, -1)
    positions = ours.cfg.rope_position(input_pos)  # our layout's gap, given to HF as explicit positions
    want = hf(idx, position_ids=positions).logits
    torch.testing.assert_close(ours(idx), want, atol=1e-5, rtol=1e-4)
    assert ours.cfg.n_mem_layer == 1  # first half (rounded down) becomes memory layers


def test_save_load_roundtrip_with_tokenizer(tmp_path, make_model):
    model = make_model()
    tok = Tokenizer.train(["alpha beta gamma delta"] * 20, vocab_size=300)
    save_checkpoint(tmp_path / "ckpt", model, tok, meta={"stage": "warmup"})
    save_checkpoint(tmp_path / "ckpt", model, tok, meta={"stage": "warmup", "again": True})  # atomic overwrite
    loaded, tok2 = load_checkpoint(tmp_path / "ckpt")
    idx = torch.randint(0, model.cfg.vocab_size, (1, 7))
    assert torch.equal(loaded(idx), model(idx))
    assert tok2.sha256 == tok.sha256
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["meta"]["again"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left behind


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a memory3 checkpoint"):
        load_checkpoint(tmp_path)


def test_tokenizer_roundtrip_and_specials(tmp_path):
    tok = Tokenizer.train(["Paris is a city in France.", "Zürich liegt in der Schweiz."] * 10, vocab_size=400)
    text = "Zürich is in Switzerland — naïve café"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any UTF-8 round-trips
    ids = tok.context_ids("Paris")
    assert ids[:3] == [tok.bos_id, tok.ref_id, tok.bos_id]
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path).sha256 == tok.sha256


def test_autotokenizer_loads_the_checkpoint_tokenizer(tmp_path, make_model):
    """Evaluation harnesses load the tokenizer with AutoTokenizer: it must encode and decode exactly as ours."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.train(["Lyon is a city in France. Ça va? 東京 is big.\n\nNew line"] * 20, vocab_size=300)
    save_checkpoint(tmp_path / "ckpt", make_model(), tok)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    for text in ["Lyon is a city in France.", " Which country is  Lyon in?\n\n Answer:", "Ça va? 東京 ünïcode"]:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == ids
        assert hf(text).input_ids == ids  # no BOS of its own: the model's sink comes from Tokenizer.context_ids
        assert hf.decode(ids) == tok.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.decode([tok.eos_id] + tok.encode("ab"), skip_special_tokens=True) == tok.decode([tok.eos_id] +
                                                                                              tok.encode("ab"))
