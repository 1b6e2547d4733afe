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


def check_cpus_left(count: int, cpus_each: float, cluster_cpus: float, *, keys: tuple[str, str],
                    what: str) -> str | None:
    """Why `what` would never finish on a cluster of `cluster_cpus` CPUs, or None. Its `count` actors or workers
    hold `cpus_each` CPUs for the whole run, and Ray Data's read, repartition and write tasks need a whole CPU beside
    them: with every CPU held they are never scheduled and the run waits forever, silently. `keys` name the two
    settings (count, CPUs each) in the message and its example."""
    held = count * cpus_each
    if held <= cluster_cpus - 1:
        return None
    fit = max(1, int((cluster_cpus - 1) / cpus_each)) if cluster_cpus > 1 and cpus_each > 0 else 1
    return (f"{keys[0]} x {keys[1]} = {count} x {cpus_each:g} = {held:g} CPUs, but this Ray cluster has "
            f"{cluster_cpus:g}: {what} needs 1 CPU left for Ray Data's read and write tasks, else it waits forever. "
            f"For example: {keys[0]}={fit} {keys[1]}={min(cpus_each, max(cluster_cpus - 1, 0.25)):g}")
