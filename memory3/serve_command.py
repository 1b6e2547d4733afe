"""`memory3 serve checkpoint=DIR [bank=DIR] [port=8000]`: start Ray and Serve on this box (or join RAY_ADDRESS),
run the application of serve/app.py, listen on 127.0.0.1, wait for /healthz, and run until Ctrl-C or SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

from omegaconf import DictConfig, OmegaConf
from ray import serve

from pipelines import console
from pipelines.ray_runtime import ensure_ray
from serve.app import build_app, wait_healthy


def main(cfg: DictConfig) -> int:
    """`memory3 serve checkpoint=DIR [bank=DIR] [port=8000]`: serve until Ctrl-C / SIGTERM."""
    args = OmegaConf.to_container(cfg, resolve=True)
    args.pop("action", None)
    app = build_app(args)  # bad settings fail here, before Ray starts
    ensure_ray(cfg.ray_address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    url = f"http://{cfg.host}:{cfg.port}"
    try:
        serve.run(app, name=cfg.app_name, route_prefix="/")
        wait_healthy(url, cfg.startup_timeout_s)
        console.say(json.dumps({"serving": url, "model": cfg.model_name, "bank": cfg.bank}))
        while not stop.wait(1.0):
            pass
        print("memory3 serve: shutting down", file=sys.stderr, flush=True)
    finally:
        if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
            serve.delete(cfg.app_name)  # a shared cluster: remove only our application
        else:
            serve.shutdown()
    return 0
