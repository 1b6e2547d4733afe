"""Configuration: OmegaConf YAML under configs/ plus `key=value` overrides from the command line.

`model: <preset>` in any config expands to that preset's full ModelConfig (configs/model/<preset>.yaml), after
which `model.<field>=...` overrides apply. Unknown keys are errors, so every setting is one something reads.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from model.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    pass


def load_config(name: str, overrides: list[str] = ()) -> DictConfig:
    path = CONFIG_DIR / f"{name}.yaml"
    cfg = OmegaConf.load(path) if path.is_file() else OmegaConf.create({})
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    preset = [o for o in overrides if o.split("=", 1)[0] == "model"]
    rest = [o for o in overrides if o.split("=", 1)[0] != "model"]
    for o in preset:
        cfg.model = o.split("=", 1)[1]
    if isinstance(cfg.get("model"), str):
        cfg.model = ModelConfig.from_name(cfg.model).to_dict()
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    except ConfigKeyError as e:
        raise ConfigError(f"unknown setting in {name} config: {e.msg.splitlines()[0]}") from None
    OmegaConf.set_struct(cfg, False)
    return cfg


def model_config(cfg: DictConfig) -> ModelConfig:
    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
