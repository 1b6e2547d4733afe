"""Presets, validation and the `memory3 info` command."""
import json
import subprocess
import sys

import pytest

from model.config import ModelConfig, preset_names


def test_every_shipped_preset_loads():
    assert {"tiny", "2.4b"} <= set(preset_names())
    for name in preset_names():
        ModelConfig.from_name(name)


def test_100m_preset_has_the_paper_proportions():
    """The GPU-scale preset between tiny and 2.4B: about 100M non-embedding parameters, half the blocks memory
    layers, grouped KV heads, 5 references per window."""
    cfg = ModelConfig.from_name("100m")
    assert 0.9e8 < cfg.num_params(non_embedding=True) < 1.1e8
    assert cfg.n_mem_layer * 2 == cfg.n_layer and cfg.n_head > cfg.n_kv_head and cfg.refs_per_window == 5


def test_paper_shape():
    cfg = ModelConfig.from_name("2.4b")
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dim) == (44, 40, 8, 80, 3200)
    assert cfg.memory_shape == (22, 2, 8, 8, 80)
    assert 2.40e9 < cfg.num_params(non_embedding=True) < 2.45e9  # paper: 2.4B non-embedding


@pytest.mark.parametrize("overrides, message", [
    ({"n_head": 6, "n_kv_head": 4}, "not a multiple"),
    ({"mem_tokens": 200}, "mem_tokens"),
    ({"n_mem_layer": 50}, "n_mem_layer"),
    ({"selection": "max"}, "selection"),
    ({"head_dim": 7}, "even"),
])
def test_bad_configs_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_name("tiny", **overrides)


def test_unknown_preset_and_keys():
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny"):
        ModelConfig.from_name("huge")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"n_layers": 3})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "memory3.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_cli_reports_paper_numbers():
    out = _cli("info", "model=2.4b")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert 2.40e9 < info["parameters_non_embedding"] < 2.45e9
    assert info["memory_layers"] == "0-21"
    assert info["reference_memory_bytes"]["sparse"] == 450_560
    assert 3.5 < info["bank_tib"]["quantized"] < 4.5 and 40 < info["bank_tib"]["sparse"] < 50


def test_cli_errors_are_clear():
    bad = _cli("info", "model=nope")
    assert bad.returncode == 2 and "unknown model preset" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli("info", "model.n_head=7")
    assert bad.returncode == 2 and "not a multiple" in bad.stderr
    bad = _cli("info", "colour=red")
    assert bad.returncode == 2 and "colour" in bad.stderr
    assert _cli("frobnicate").returncode == 2
    helped = _cli("info", "--help")
    assert helped.returncode == 0 and "quantizer" in helped.stdout
    assert "quickstart" in _cli("--help").stdout
