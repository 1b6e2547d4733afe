"""The `memory3` command line: bad usage gets a message naming the key and an example, exit code 2."""
from __future__ import annotations

import pytest

from memory3 import cli
from configs import CONFIG_DIR

REQUIRED = {"prepare": ["corpus", "out"], "encode": ["bank", "checkpoint", "corpus"], "index": ["bank"],
            "bank": ["bank"], "train": ["data", "out"], "eval": ["bank", "checkpoint", "qa"],
            "serve": ["checkpoint"], "corpus": ["out"]}


def test_only_info_and_quickstart_run_without_settings():
    assert set(cli.COMMANDS) - set(REQUIRED) == {"info", "quickstart"}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_missing_required_keys_are_named_with_an_example(command, capsys):
    code = cli.main([command])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for key in REQUIRED[command]:
        assert f"{key}=..." in err, err
    assert f"example: {cli.EXAMPLES[command]}" in err, err
    assert cli.EXAMPLES[command].startswith(f"memory3 {command} ")


def test_every_required_key_is_marked_in_its_yaml():
    """The YAML is the documentation: a required key reads `???` there."""
    from omegaconf import OmegaConf

    for command, keys in REQUIRED.items():
        cfg = OmegaConf.load(CONFIG_DIR / f"{command}.yaml")
        assert sorted(OmegaConf.missing_keys(cfg)) == sorted(keys), command


def test_example_lines_parse(capsys):
    """Each example is a valid command line: every key it sets exists in the command's config."""
    for command, example in cli.EXAMPLES.items():
        overrides = [w for w in example.split()[2:] if "=" in w]
        cfg = cli.load_config(command, overrides)
        assert not cli.missing_keys(cfg), (command, cli.missing_keys(cfg))


def test_unknown_key_and_bad_profile(capsys):
    assert cli.main(["eval", "checkpoint=a", "bank=b", "qa=c", "batchsize=3"]) == 2
    assert "batchsize" in capsys.readouterr().err
    assert cli.main(["quickstart", "profile=nope"]) == 2
    assert "profile=nope is not one of ['smoke']" in capsys.readouterr().err


def test_profile_values_sit_under_command_line_overrides():
    cfg = cli.load_config("quickstart", ["profile=smoke", "warmup.max_steps=3"])
    assert cfg.profile == "smoke" and cfg.warmup.max_steps == 3 and cfg.continual.max_steps == 10


def test_a_model_preset_with_changes():
    """`model: {preset: NAME, KEY: VALUE}` in a YAML is the preset with those fields changed; `model=NAME` on the
    command line is the preset itself; a bad field is named."""
    from configs import ConfigError, expand_model
    from model.config import ModelConfig

    cfg = cli.load_config("quickstart", [])
    assert cfg.model.memory_positions == "ranked"
    assert cfg.model.n_layer == ModelConfig.from_name("tiny").n_layer
    assert cli.load_config("quickstart", ["model=tiny"]).model.memory_positions == "parallel"
    with pytest.raises(ConfigError, match="memory_positions='sideways'"):
        expand_model({"preset": "tiny", "memory_positions": "sideways"})
