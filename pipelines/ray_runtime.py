"""Joining Ray: a submitted job or a cluster (RAY_ADDRESS / `ray_address=`), else a local instance on this box."""
from __future__ import annotations

import os
import signal
import threading

import ray


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Idempotent `ray.init`: tests and the quickstart share one instance; jobs connect to their cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ray.init(address=address, ignore_reinit_error=True, logging_level="WARNING", log_to_driver=True, **init_kwargs)
    for signum, handler in handlers.items():  # ray.init installs its own; a command's own stop wins (memory3/cli.py)
        if callable(handler) and handler is not signal.default_int_handler \
                and threading.current_thread() is threading.main_thread():
            signal.signal(signum, handler)
