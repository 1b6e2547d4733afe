"""The serving application: `build_app(args)` composes the deployments; `main(cfg)` is `memory3 serve`.

    Ingress (FastAPI) ──> Generator (model + continuous batching) ──> Retriever (embedder + FAISS)
        │                       └───────────────────────────────────> MemoryStore (bank rows -> memories, LRU)
        ├──> Retriever (RAG mode)
        └──> BankWriter (admin API, live bank version)

Each deployment takes its own replicas / autoscaling and resources from the config's `deployments` section.
`serve run infra/serve.yaml` and KubeRay's RayService import `serve.app:build_app` with `args`; `memory3 serve`
starts Ray and Serve on this box, listens on 127.0.0.1, waits for /healthz, and runs until Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError
from ray import serve
from ray.serve import Application

from memory3.config import CONFIG_DIR
from pipelines import storage
from serve.bank_writer import BankWriter
from serve.generator import Generator
from serve.ingress import Ingress
from serve.loading import load_tokenizer, local_checkpoint
from serve.memory_store import MemoryStoreDeployment
from serve.retriever import RetrieverDeployment


def load_settings(args: dict | DictConfig | None) -> DictConfig:
    """configs/serve.yaml with `args` merged over it; unknown keys are errors."""
    cfg = OmegaConf.load(CONFIG_DIR / "serve.yaml")
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(args or {})))
    except ConfigKeyError as e:
        raise ValueError(f"unknown serve setting: {e.msg.splitlines()[0]}") from None
    if not cfg.get("checkpoint"):  # `???` in serve.yaml: required
        raise ValueError("serve needs a model: checkpoint=<checkpoint folder or s3:// URI>")
    if cfg.defaults.memory_mode not in ("memory", "none", "rag"):
        raise ValueError(f"defaults.memory_mode={cfg.defaults.memory_mode!r} must be memory, none or rag")
    writer = cfg.deployments.bank_writer
    if writer.num_replicas != 1 or writer.autoscaling_config:
        raise ValueError("deployments.bank_writer must have exactly one replica (the bank's single writer)")
    for key in ("checkpoint", "bank"):  # replicas may run elsewhere: pass them absolute local paths
        if cfg[key] and not storage.is_remote(cfg[key]):
            cfg[key] = os.path.abspath(cfg[key])
    return cfg


def deployment_options(d: DictConfig) -> dict:
    """Ray Serve `.options()` from one entry of the config's `deployments` section."""
    options = {"ray_actor_options": {"num_cpus": float(d.num_cpus), "num_gpus": float(d.num_gpus)},
               "max_ongoing_requests": int(d.max_ongoing_requests)}
    if d.autoscaling_config:
        options["autoscaling_config"] = OmegaConf.to_container(d.autoscaling_config, resolve=True)
    else:
        options["num_replicas"] = int(d.num_replicas)
    return options


def check_bank_matches(checkpoint: str, bank: str) -> None:
    """A bank is readable only by the weights and tokenizer that wrote it (paper App. A, Remark 9)."""
    from pipelines.bank import MemoryBank, weights_sha256

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
        cfg.checkpoint, plain["decoding"], retriever, memory_store)
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


def main(cfg: DictConfig) -> int:
    """`memory3 serve checkpoint=DIR [bank=DIR] [port=8000]`: serve until Ctrl-C / SIGTERM."""
    from pipelines.ray_runtime import ensure_ray

    args = OmegaConf.to_container(cfg, resolve=True)
    args.pop("action", None)
    app = build_app(args)  # bad settings fail here, before Ray starts
    ensure_ray(cfg.ray_address)
    serve.start(http_options={"host": cfg.host, "port": int(cfg.port)})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    url = f"http://{cfg.host}:{cfg.port}"
    try:
        serve.run(app, name=cfg.app_name, route_prefix="/")
        wait_healthy(url, float(cfg.startup_timeout_s))
        print(json.dumps({"serving": url, "model": cfg.model_name, "bank": cfg.bank}), flush=True)
        while not stop.wait(1.0):
            pass
        print("memory3 serve: shutting down", file=sys.stderr, flush=True)
    finally:
        if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
            serve.delete(cfg.app_name)  # a shared cluster: remove only our application
        else:
            serve.shutdown()
    return 0
