"""The `memory3` command: `memory3 <command> [word ...] [key=value ...] [verbose=true]`.

Each command is a `main(cfg)` function; its defaults are configs/<command>.yaml. Words without `=` after the
command (e.g. `memory3 bank verify`) arrive as `cfg.action`. Commands that run Ray jobs show one line per stage;
Ray's, DeepSpeed's and the workers' output goes to a log file (`verbose=true` shows it live instead).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from omegaconf.errors import MissingMandatoryValue

from configs import CONFIG_DIR, ConfigError, load_config
from pipelines import console

COMMANDS = {
    "info": ("memory3.info:main", "model shape, parameter count and memory sizes as JSON"),
    "corpus": ("pipelines.geo_corpus:main", "write the bundled geonames corpus: `memory3 corpus geo out=DIR`"),
    "prepare": ("pipelines.prepare:main", "train the tokenizer and pack training sequences (Ray Data)"),
    "encode": ("pipelines.encode:main", "encode a corpus into a sparse memory bank + FAISS index (Ray Data)"),
    "index": ("pipelines.index:main", "(re)build the FAISS retrieval index of a bank"),
    "bank": ("pipelines.bank_admin:main", "bank maintenance: `memory3 bank verify|info|delete|compact bank=DIR`"),
    "train": ("pipelines.train:main", "two-stage pretraining on Ray Train + DeepSpeed (stage=warmup|continual)"),
    "eval": ("pipelines.evaluate:main", "accuracy and speed with explicit memory, no memory and RAG"),
    "serve": ("memory3.serve_command:main", "OpenAI-compatible Ray Serve endpoint with explicit memory"),
    "quickstart": ("memory3.quickstart:main", "the whole pipeline end to end on the bundled corpus"),
}
EXAMPLES = {  # shown when a required key is missing
    "info": "memory3 info model=2.4b",
    "corpus": "memory3 corpus geo out=runs/geo",
    "prepare": "memory3 prepare corpus=runs/geo/train.jsonl out=runs/data",
    "encode": "memory3 encode corpus=runs/geo/references.jsonl bank=runs/bank checkpoint=runs/train/final",
    "index": "memory3 index bank=runs/bank",
    "bank": "memory3 bank verify bank=runs/bank",
    "train": "memory3 train stage=warmup data=runs/data out=runs/warmup",
    "eval": "memory3 eval checkpoint=runs/quickstart/checkpoint bank=runs/quickstart/bank "
            "qa=runs/quickstart/corpus/qa.jsonl",
    "serve": "memory3 serve checkpoint=runs/quickstart/checkpoint bank=runs/quickstart/bank",
    "quickstart": "memory3 quickstart out=runs/quickstart",
}
CAPTURED = {"prepare", "encode", "index", "bank", "train", "eval", "serve", "quickstart"}  # run Ray or torch jobs


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
    verbose = any(a in ("verbose=true", "--verbose", "-v") for a in rest)
    rest = [a for a in rest if a not in ("verbose=true", "verbose=false", "--verbose", "-v")]
    words = [a for a in rest if "=" not in a]
    try:
        cfg = load_config(name, [a for a in rest if "=" in a])
        missing = missing_keys(cfg)
    except (ConfigError, ValueError) as e:
        print(f"memory3 {name}: {e}", file=sys.stderr)
        return 2
    if missing:
        print(missing_message(name, missing), file=sys.stderr)
        return 2
    if words:
        cfg.action = " ".join(words)
    module, func = COMMANDS[name][0].split(":")
    # A submitted Ray job's output is already its log (`ray job logs`): leave it there.
    log = log_path(name, cfg) if name in CAPTURED and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ else None
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, `kill`, `ray job stop`: one clean stop
        signal.signal(signum, _interrupt)
    try:
        if log is None:
            result = run_command(module, func, cfg)
        else:
            with console.capture_output(log, verbose=verbose):
                try:
                    result = run_command(module, func, cfg)
                except BaseException as e:  # the traceback goes to the log; Ray stops before the terminal is back
                    if not isinstance(e, (MissingMandatoryValue, ValueError, FileNotFoundError, KeyboardInterrupt)):
                        traceback.print_exc()
                    stop_ray()
                    raise
    except MissingMandatoryValue as e:  # a required key read deeper in (e.g. inside a nested section)
        print(missing_message(name, [e.full_key]), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"memory3 {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memory3 {name}: interrupted; stopping the local Ray it started", file=sys.stderr)
        stop_ray()
        return 130
    except Exception as e:
        if log is None or verbose:
            raise
        print(f"memory3 {name}: failed: {type(e).__name__}: {e}\n  the full traceback is in the log", file=sys.stderr)
        return 1
    finally:
        if log is not None and not verbose:
            print(f"log: {log}", file=sys.stderr)
    return result if isinstance(result, int) else 0  # a command may return its summary instead of a code


def missing_keys(cfg) -> list[str]:
    from omegaconf import OmegaConf

    return sorted(OmegaConf.missing_keys(cfg))


def missing_message(name: str, keys: list[str]) -> str:
    listed = ", ".join(f"{k}=..." for k in keys)
    return (f"memory3 {name}: missing required setting{'s' if len(keys) > 1 else ''} {listed}\n"
            f"  example: {EXAMPLES[name]}\n  all settings: memory3 {name} --help")


def log_path(name: str, cfg) -> Path:
    """<out>/<command>.log when the command writes a local folder, else logs/<command>-<time>.log."""
    out = cfg.get("out") if "out" in cfg else None
    if out and "://" not in str(out) and not str(out).endswith((".json", ".jsonl")):
        return Path(str(out)).resolve() / f"{name}.log"
    return Path("logs").resolve() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_command(module: str, func: str, cfg):
    """The command's main. Ctrl-C reaches Ray's own processes too (one process group), so inside a Ray call it
    surfaces as Ray's SystemExit, often before any Python handler runs: the signal's byte on the wakeup pipe
    (written by the interpreter the moment the signal arrives) says it was an interruption."""
    wakeup_read, wakeup_write = os.pipe()
    for fd in (wakeup_read, wakeup_write):
        os.set_blocking(fd, False)
    previous = signal.set_wakeup_fd(wakeup_write)
    try:
        return getattr(importlib.import_module(module), func)(cfg)
    except SystemExit:
        try:
            received = os.read(wakeup_read, 256)
        except BlockingIOError:
            received = b""
        if {signal.SIGINT, signal.SIGTERM} & set(received):
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wakeup_read)
        os.close(wakeup_write)


def stop_ray() -> None:
    """Shut down the Ray this process started (a local instance takes its raylet, GCS and workers with it)."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception as e:  # already going away
        print(f"memory3: ray shutdown: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
