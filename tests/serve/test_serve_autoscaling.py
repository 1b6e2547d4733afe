"""Generator autoscaling on a real local Ray: the application `memory3 serve` runs (serve/app.py from
configs/serve.yaml with overrides), a random-weight tiny checkpoint and a real memory bank, real HTTP load from
client threads. Under load the generator goes from one replica to two, and back to one when the load ends; no
request fails on the way, the ones in flight while a replica is added or drained included."""
from __future__ import annotations

import threading
import time
from typing import Callable

import httpx
from ray import serve

from serve_testing import serving

APP, MODEL = "memory3-autoscale", "memory3"
PROMPT = "Osaka is a city in Japan. It has a population of about 548 thousand people."
MAX_TOKENS = 24
# short delays and look-back so the test sees both decisions within seconds; metrics_interval_s is how often
# replicas and handles report their ongoing requests (Ray's default, 10 s, would dominate the test's time)
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1.0,
               "downscale_delay_s": 2.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}
HEAVY_CLIENTS = 5  # steadily more than target_ongoing_requests in flight: the autoscaler wants more replicas
# one sequential client keeps at most 1 request in flight (< target): the generator scales down under it


def check_completion(r: httpx.Response) -> str | None:
    """What is wrong with one completion response, or None."""
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:300]}"
    body = r.json()
    choice = body["choices"][0]
    if (body["object"] != "text_completion" or not isinstance(choice["text"], str)
            or choice["finish_reason"] not in ("length", "stop")
            or not 1 <= body["usage"]["completion_tokens"] <= MAX_TOKENS
            or not body["memories"] or not all(m["id"].startswith("city-") for m in body["memories"])):
        return f"invalid body: {body}"
    return None


class Load:
    """HTTP clients on threads, each sending one completion after another until its stop event is set."""

    def __init__(self, url: str):
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.clients: list[tuple[threading.Thread, threading.Event]] = []

    def add_client(self) -> threading.Event:
        stop = threading.Event()
        thread = threading.Thread(target=self._client, args=(stop,), daemon=True)
        thread.start()
        self.clients.append((thread, stop))
        return stop

    def _client(self, stop: threading.Event) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not stop.is_set():
                try:
                    problem = check_completion(http.post("/v1/completions", json={
                        "model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.8}))
                except Exception as e:  # a dropped connection, a timeout, a body that is not JSON
                    problem = f"{type(e).__name__}: {e}"
                with self.lock:
                    if problem:
                        self.failures.append(problem)
                    else:
                        self.ok += 1

    def stop_all(self) -> None:
        for _, stop in self.clients:
            stop.set()
        for thread, _ in self.clients:
            thread.join(timeout=150)
            assert not thread.is_alive(), "a load client is stuck in a request"


class ReplicaWatch:
    """Polls Serve's status for the generator's running replicas; keeps the sequence of counts it saw."""

    def __init__(self):
        self.history: list[int] = []

    def states(self) -> dict[str, int]:
        """Replicas by state (STARTING, RUNNING, STOPPING, ...)."""
        states = dict(serve.status().applications[APP].deployments["Generator"].replica_states)
        running = states.get("RUNNING", 0)
        if not self.history or self.history[-1] != running:
            self.history.append(running)
        return states

    def wait(self, condition: Callable[[dict[str, int]], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(states := self.states()):
            assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f}s: {states}; running: {self.history}"
            time.sleep(0.25)


def test_generator_scales_up_under_load_and_back_down_without_failed_requests(
        ray_local, tiny_checkpoint, tiny_bank):
    args = {"checkpoint": tiny_checkpoint, "bank": tiny_bank, "model_name": MODEL,
            "decoding": {"max_batch_size": 8, "torch_threads": 1},
            # fractional CPUs: the second generator replica fits on the test's 2-CPU Ray beside the others
            "deployments": {"generator": {"num_cpus": 0.5, "autoscaling_config": AUTOSCALING}}}
    with serving(APP, args) as url:
        watch = ReplicaWatch()
        watch.wait(lambda s: s == {"RUNNING": 1}, 60, "the generator did not start with min_replicas=1")
        load = Load(url)
        try:
            heavy = [load.add_client() for _ in range(HEAVY_CLIENTS)]
            light = load.add_client()
            watch.wait(lambda s: s.get("RUNNING") == 2, 120, "the generator did not scale up to 2 replicas under load")

            # the new replica takes a share of the traffic: both replicas have decoded requests
            generator = serve.get_deployment_handle("Generator", APP)
            served: dict[str, int] = {}
            deadline = time.monotonic() + 60
            while sum(n > 0 for n in served.values()) < 2:
                assert time.monotonic() < deadline, f"requests reached only {served}"
                stats = generator.stats.remote().result(timeout_s=30)
                served[stats["replica"]] = stats["submitted"]
                time.sleep(0.1)

            for stop in heavy:  # the load ends; one sequential client keeps requests in flight while it drains
                stop.set()
            # back to one replica, the other one drained and gone
            watch.wait(lambda s: s == {"RUNNING": 1}, 120, "the generator did not scale back down to 1 replica")
            light.set()
        finally:
            load.stop_all()
    assert watch.history == [1, 2, 1], watch.history
    assert load.failures == [], f"{len(load.failures)} of {load.ok + len(load.failures)} requests failed: " \
                                f"{load.failures[:3]}"
    assert load.ok >= HEAVY_CLIENTS
