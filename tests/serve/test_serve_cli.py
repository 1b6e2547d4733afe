"""`memory3 serve`: starts its own Ray, answers on 127.0.0.1 once /healthz is 200, stops cleanly on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve.app import wait_healthy
from serve_testing import free_port


def test_memory3_serve_runs_until_sigterm(tiny_checkpoint, tmp_path):
    """Without a bank (fewer replicas to start; test_serve_api.py covers memory): plain decoding, admin token
    from the environment."""
    port = free_port()
    exe = Path(sys.executable).with_name("memory3")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MEMORY3_ADMIN_TOKEN": "from-env"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([str(exe), "serve", f"checkpoint={tiny_checkpoint}", f"port={port}",
                             "ray_address=local"], stdout=subprocess.PIPE, stderr=log, text=True,
                            env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        wait_healthy(url, 300)
        print(f"memory3 serve healthy after {time.monotonic() - t0:.0f}s")
        answer = httpx.post(f"{url}/v1/completions", timeout=60,
                            json={"model": "memory3", "prompt": "Lyon is a city in", "max_tokens": 3}).json()
        assert answer["memories"] == [] and answer["usage"]["completion_tokens"] == 3
        denied = httpx.delete(f"{url}/v1/memories/x%230", headers={"Authorization": "Bearer wrong"})
        allowed = httpx.delete(f"{url}/v1/memories/x%230", headers={"Authorization": "Bearer from-env"})
        assert (denied.status_code, allowed.status_code) == (401, 404)  # the token came from the environment
        assert allowed.json()["error"]["code"] == "no_memory_bank"
        assert proc.poll() is None  # still serving
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        print(f"memory3 serve stopped {time.monotonic() - t0:.0f}s after SIGTERM")
        assert proc.returncode == 0, log.seek(0) or log.read()[-3000:]
        assert json.loads(out.strip().splitlines()[0]) == {"serving": url, "model": "memory3", "bank": None}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
