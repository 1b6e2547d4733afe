"""Recent durations of one kind (a request's wait for the engine, a prefill, a retrieval round trip), summarised for
the replicas' `stats()`: where a served request's first token spends its time, read without a profiler."""
from __future__ import annotations

import gc
import threading
import time
from collections import deque


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile (0 <= q <= 1) of `values`; None for none."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class Timings:
    """The last `keep` durations in seconds, added from any thread."""

    def __init__(self, keep: int = 4096):
        self.values: deque[float] = deque(maxlen=keep)
        self.lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self.lock:
            self.values.append(seconds)

    def clear(self) -> None:
        with self.lock:
            self.values.clear()

    def summary(self, digits: int = 4) -> dict:
        """{"n", "p50", "p90", "max"} over the kept durations (None where there are none)."""
        with self.lock:
            values = list(self.values)
        quantiles = {name: percentile(values, q) for name, q in (("p50", 0.5), ("p90", 0.9), ("max", 1.0))}
        return {"n": len(values), **{k: None if v is None else round(v, digits) for k, v in quantiles.items()}}


class CollectorPauses(Timings):
    """The garbage collector's full passes (its oldest generation) in this process: each one holds the GIL, so
    every thread of a replica (the engine's steps, the event loop's streams) stands still while it runs."""

    def __init__(self):
        super().__init__()
        self._began: float | None = None
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:  # no lock: the pass may have begun inside one of this object's methods
            self.values.append(time.perf_counter() - self._began)
            self._began = None

    def close(self) -> None:
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)
