"""The `memory3` command: `memory3 <command> [word ...] [key=value ...]`.

Each command is a `main(cfg)` function; its defaults are configs/<command>.yaml. Words without `=` after the
command (e.g. `memory3 bank verify`) arrive as `cfg.action`.
"""
from __future__ import annotations

import importlib
import sys

from omegaconf import OmegaConf

from configs import CONFIG_DIR, ConfigError, load_config

COMMANDS = {
    "info": ("memory3.info:main", "model shape, parameter count and memory sizes as JSON"),
    "corpus": ("pipelines.geo_corpus:main", "write the bundled geonames corpus: `memory3 corpus geo out=DIR`"),
    "prepare": ("pipelines.prepare:main", "train the tokenizer and pack training sequences (Ray Data)"),
    "encode": ("pipelines.encode:main", "encode a corpus into a sparse memory bank + FAISS index (Ray Data)"),
    "index": ("pipelines.index:main", "(re)build the FAISS retrieval index of a bank"),
    "bank": ("pipelines.bank_admin:main", "bank maintenance: `memory3 bank verify bank=DIR`"),
    "train": ("pipelines.train:main", "two-stage pretraining on Ray Train + DeepSpeed (stage=warmup|continual)"),
    "eval": ("pipelines.evaluate:main", "accuracy and speed with explicit memory, no memory and RAG"),
    "serve": ("memory3.serve_command:main", "OpenAI-compatible Ray Serve endpoint with explicit memory"),
    "quickstart": ("pipelines.quickstart:main", "the whole pipeline end to end on the bundled corpus"),
}


def usage() -> str:
    lines = ["usage: memory3 <command> [word ...] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`memory3 <command> --help` shows a command's settings (configs/<command>.yaml)."]
    return "\n".join(lines)


def command_help(name: str) -> str:
    target, text = COMMANDS[name]
    path = CONFIG_DIR / f"{name}.yaml"
    settings = path.read_text() if path.is_file() else "(no settings)\n"
    return f"memory3 {name}: {text}\n\nsettings ({path.name}), override with key=value:\n\n{settings}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"memory3: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(command_help(name))
        return 0
    words = [a for a in rest if "=" not in a]
    try:
        cfg = load_config(name, [a for a in rest if "=" in a])
    except (ConfigError, ValueError) as e:
        print(f"memory3 {name}: {e}", file=sys.stderr)
        return 2
    if words:
        cfg.action = " ".join(words)
    module, func = COMMANDS[name][0].split(":")
    try:
        result = getattr(importlib.import_module(module), func)(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"memory3 {name}: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0  # a command may return its summary instead of a code


if __name__ == "__main__":
    sys.exit(main())
