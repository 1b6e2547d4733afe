"""Joining Ray: a submitted job or a cluster (RAY_ADDRESS / `ray_address=`), else a local instance on this box."""
from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Idempotent `ray.init`: tests and the quickstart share one instance; jobs connect to their cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, ignore_reinit_error=True, logging_level="WARNING", log_to_driver=True, **init_kwargs)
