"""Configuration: the typed configs of configs/schema.py, their documented defaults in configs/<command>.yaml, and
`key=value` overrides from the command line.

`model: <preset>` in any config expands to that preset's full ModelConfig (configs/model/<preset>.yaml), after
which `model.<field>=...` overrides apply. Unknown keys and values of the wrong type are errors that name the key,
so every setting is one something reads. Required keys are `???` in the YAML: reading one that was not given
raises omegaconf's MissingMandatoryValue, which names it. A config with a `profiles:` section takes
`profile=<name>`: that profile's values go over the defaults and under the command line's other overrides
(e.g. `memory3 quickstart profile=smoke`).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from configs.schema import SCHEMAS
from model.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    pass


def defaults(name: str) -> DictConfig:
    """The typed defaults of a command: its schema with configs/<name>.yaml over it (a preset name expanded)."""
    path = CONFIG_DIR / f"{name}.yaml"
    yaml = OmegaConf.load(path) if path.is_file() else OmegaConf.create({})
    if "model" in yaml:
        yaml.model = expand_model(OmegaConf.to_container(yaml.model) if OmegaConf.is_config(yaml.model) else yaml.model)
    return merged(name, OmegaConf.structured(SCHEMAS[name]) if name in SCHEMAS else OmegaConf.create({}), yaml)


def expand_model(value):
    """A config's `model`: a preset name, a preset with changes ({preset: NAME, KEY: VALUE, ...}), or fields."""
    if isinstance(value, str):
        return ModelConfig.from_name(value).to_dict()
    if isinstance(value, dict) and "preset" in value:
        changes = {k: v for k, v in value.items() if k != "preset"}
        try:
            return ModelConfig.from_name(value["preset"], **changes).to_dict()
        except ValueError as e:
            raise ConfigError(f"bad model setting: {e}") from None
    return value


def merged(name: str, *parts) -> DictConfig:
    """parts merged left to right under the first one's schema; a bad key or value is a ConfigError naming it."""
    try:
        return OmegaConf.merge(*parts)
    except ConfigKeyError as e:
        raise ConfigError(f"unknown {name} setting: {e.msg.splitlines()[0]}") from None
    except ValidationError as e:
        raise ConfigError(f"bad {name} setting {e.full_key}: {e.msg.splitlines()[0]}") from None


def load_config(name: str, overrides: list[str] = ()) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    cfg = defaults(name)
    profile = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "profile"]
    if profile:  # a named set of values from the YAML's `profiles:`, under the command line's own overrides
        profiles = cfg.get("profiles") or {}
        if profile[-1] not in profiles:
            raise ConfigError(f"profile={profile[-1]} is not one of {sorted(profiles)} (configs/{name}.yaml)")
        chosen = OmegaConf.to_container(profiles[profile[-1]])
        if "model" in chosen:
            chosen["model"] = expand_model(chosen["model"])
        cfg = merged(name, cfg, chosen, {"profile": profile[-1]})
    preset = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "model"]
    if preset:  # a preset on the command line replaces the whole model section, then model.* overrides apply
        cfg = merged(name, cfg, {"model": ModelConfig.from_name(preset[-1]).to_dict()})
    rest = [o for o in overrides if o.split("=", 1)[0] not in ("model", "profile")]
    cfg = merged(name, cfg, OmegaConf.from_dotlist(rest))
    OmegaConf.set_struct(cfg, False)  # the CLI adds `action` (words after the command)
    return cfg


def typed(name: str, cfg) -> DictConfig:
    """A config handed to a job (from load_config, or built by a caller such as a test or the quickstart) as the
    command's typed config: the same checks as on the command line, and typed values without casts."""
    return merged(name, OmegaConf.structured(SCHEMAS[name]), cfg)


def model_config(cfg: DictConfig) -> ModelConfig:
    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
