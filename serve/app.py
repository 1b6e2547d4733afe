"""The serving application: `build_app(args)` composes the deployments (`memory3 serve` is memory3/serve_command.py).

    Ingress (FastAPI) ──> Generator (model + continuous batching) ──> Retriever (embedder + FAISS)
        │                       └───────────────────────────────────> MemoryStore (bank rows -> memories, LRU)
        ├──> Retriever (RAG mode)
        └──> BankWriter (admin API, live bank version)

Each deployment takes its own replicas / autoscaling and resources from the config's `deployments` section.
`serve run infra/serve.yaml` and KubeRay's RayService import `serve.app:build_app` with `args`.
"""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

from omegaconf import DictConfig, OmegaConf
from ray.serve import Application
from ray.serve.config import AutoscalingConfig

from bank import storage
from bank.checkpoints import load_tokenizer, local_checkpoint
from bank.format import weights_sha256
from bank.reader import MemoryBank
from configs import defaults, merged
from serve.bank_writer import BankWriter
from serve.generator import Generator
from serve.ingress import Ingress
from serve.memory_store import MemoryStoreDeployment
from serve.retriever import RetrieverDeployment


def load_settings(args: dict | DictConfig | None) -> DictConfig:
    """configs/serve.yaml with `args` merged over it; unknown keys and wrong types are errors (ValueError)."""
    cfg = merged("serve", defaults("serve"), OmegaConf.create(dict(args or {})))
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise ValueError("serve needs a model: checkpoint=<checkpoint folder or s3:// URI>")
    if cfg.defaults.memory_mode not in ("memory", "none", "rag"):
        raise ValueError(f"defaults.memory_mode={cfg.defaults.memory_mode!r} must be memory, none or rag")
    for name, d in cfg.deployments.items():
        if d.autoscaling_config:
            check_autoscaling(f"deployments.{name}.autoscaling_config",
                              OmegaConf.to_container(d.autoscaling_config, resolve=True))
    writer = cfg.deployments.bank_writer
    if writer.num_replicas != 1 or writer.autoscaling_config:
        raise ValueError("deployments.bank_writer must have exactly one replica (the bank's single writer)")
    for key in ("checkpoint", "bank"):  # replicas may run elsewhere: pass them absolute local paths
        if cfg[key] and not storage.is_remote(cfg[key]):
            cfg[key] = os.path.abspath(cfg[key])
    return cfg


def check_autoscaling(key: str, config: dict) -> None:
    """Ray Serve's checks of an autoscaling config, before Ray starts, and one more: Ray ignores keys it does not
    know, so a misspelt key (or `{max_replicas:2}` on a command line, without the space OmegaConf needs after the
    colon) would silently leave the deployment at one replica."""
    unknown = sorted(set(config) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(f"{key} has unknown keys {unknown}; Ray Serve's are {sorted(AutoscalingConfig.model_fields)}"
                         " (on a command line write {max_replicas: 2} with a space, or "
                         f"{key}.max_replicas=2)")
    try:
        AutoscalingConfig(**config)
    except ValueError as e:  # pydantic's ValidationError
        errors = e.errors() if hasattr(e, "errors") else [{"msg": str(e)}]
        raise ValueError(f"{key}: " + "; ".join(err["msg"] for err in errors)) from None


def deployment_options(d: DictConfig) -> dict:
    """Ray Serve `.options()` from one entry of the config's `deployments` section."""
    options = {"ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
               "max_ongoing_requests": d.max_ongoing_requests}
    if d.autoscaling_config:
        options["autoscaling_config"] = OmegaConf.to_container(d.autoscaling_config, resolve=True)
    else:
        options["num_replicas"] = d.num_replicas
    return options


def check_bank_matches(checkpoint: str, bank: str) -> None:
    """A bank is readable only by the weights and tokenizer that wrote it (paper App. A, Remark 9)."""
    MemoryBank.open(bank, expect_model_sha=weights_sha256(checkpoint),
                    expect_tokenizer_sha=load_tokenizer(checkpoint).sha256)


def build_app(args: dict | None = None) -> Application:
    """The application for `serve run`/`serve deploy`/RayService (`import_path: serve.app:build_app`)."""
    cfg = load_settings(args)
    local_checkpoint(cfg.checkpoint)  # fails fast on a missing checkpoint
    load_tokenizer(cfg.checkpoint)
    plain = OmegaConf.to_container(cfg, resolve=True)
    deps = cfg.deployments
    retriever = memory_store = writer = None
    if cfg.bank:
        if cfg.check_bank:
            check_bank_matches(cfg.checkpoint, cfg.bank)
        retriever = RetrieverDeployment.options(**deployment_options(deps.retriever)).bind(
            cfg.bank, plain["retrieval"])
        memory_store = MemoryStoreDeployment.options(**deployment_options(deps.memory_store)).bind(
            cfg.bank, plain["memory"])
        writer = BankWriter.options(**deployment_options(deps.bank_writer)).bind(
            cfg.bank, cfg.checkpoint, plain["writer"], plain["retrieval"]["embedder"])
    generator = Generator.options(**deployment_options(deps.generator)).bind(
        cfg.checkpoint, plain["decoding"], retriever, memory_store, cfg.bank, plain["memory"])
    ingress_settings = {k: plain[k] for k in ("checkpoint", "model_name", "admin_token", "limits", "defaults",
                                                "replica_failure_retries")}
    return Ingress.options(**deployment_options(deps.ingress)).bind(
        ingress_settings, generator, retriever, memory_store, writer)


def serve_running() -> bool:
    """Whether Serve already runs on this Ray cluster. Its HTTP proxies then keep the address they were started
    with (`serve.start` ignores a new one), and whoever started it owns its shutdown."""
    import ray

    return any(a["name"] == "SERVE_CONTROLLER_ACTOR" and a["namespace"] == "serve"
               for a in ray.util.list_named_actors(all_namespaces=True))


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read()[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f}s (last: {last})")
