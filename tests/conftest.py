"""Shared test fixtures: one real local Ray instance per session, and a real S3 endpoint (moto's server)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

# tests/bank/test_bank.py holds the tiny-checkpoint and document helpers that tests/pipelines imports too
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bank"))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # one-box tests: no token dance between processes
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def grad_mode_is_restored():
    """A test that switches autograd off for the session breaks every later test that trains: name it."""
    import torch

    assert torch.is_grad_enabled(), "autograd was left disabled by an earlier test"
    yield
    assert torch.is_grad_enabled(), "this test left autograd disabled (use a fixture or a with-block)"


@pytest.fixture(scope="session")
def ray_local():
    """A fresh local Ray (never an already running cluster), 2 CPUs, shared by the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 object_store_memory=1_500_000_000)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; sets AWS_* so s3fs, pyarrow and Ray Data all reach it."""
    port = free_port()
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url, "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A new empty bucket; returns its s3:// URI."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"
