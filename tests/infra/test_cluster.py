"""A real 2-node Ray cluster on this box (memory3/cluster.py): separate `ray start` processes, a `ray job submit`
of `memory3 encode` shipped as the working directory, the bank checked by `memory3 bank verify`, and the encoding
throughput read from the nodes' Prometheus endpoints while the job runs.

The cluster runs with token auth on, as docs/cluster.md asks of real clusters: the worker node joins with the
token, the CLI sends it (`RAY_AUTH_MODE=token` + `RAY_AUTH_TOKEN`), and clients without it are refused. The token
lives in the environment only; ~/.ray/auth_token is never touched. (The dev cluster's default is auth off.)

Every cluster here has its own --temp-dir and free ports and is stopped by the PIDs it started: other tests run
their own local Ray on this machine at the same time, so no global `ray stop`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from memory3.cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
MEMORY3 = str(Path(sys.executable).with_name("memory3"))
ENCODE_METRICS = ("memory3_encode_references_total", "memory3_encode_tokens_total",
                  "memory3_encode_bytes_written_total", "memory3_encode_errors_total")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def client_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no RAY_ADDRESS of some other cluster, this venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


TOKEN = uuid.uuid4().hex + uuid.uuid4().hex  # this module's cluster token (64 hex characters, like Ray's own)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A CLI call as a user with the token runs it, from the repo root."""
    return subprocess.run(cmd, cwd=REPO, env=env or client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN),
                          capture_output=True, text=True, timeout=timeout)


def scrape(cluster: LocalCluster) -> dict[str, float]:
    """Sum of each ray_memory3_* sample over all nodes' metrics endpoints (Prometheus text format)."""
    totals: dict[str, float] = {}
    for url in cluster.metrics_urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            m = re.match(r"^ray_(memory3_[a-z0-9_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
            if m:
                totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(2))
    return totals


@pytest.fixture(scope="module")
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="m3c-", dir="/tmp")  # short: Ray's socket paths live below it
    cluster = LocalCluster.on_free_ports(
        temp_dir, workers=1, num_cpus=1, memory=3 * 1024**3, object_store_memory=300 * 1024**2, stop_with_parent=True,
        env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
             "RAY_metrics_report_interval_ms": "1000"})  # export often: the job is short
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def encode_inputs(tmp_path_factory) -> dict[str, Path]:
    """A random-weight tiny checkpoint and a JSONL corpus with one malformed line."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer
    from model.transformer import Transformer

    root = tmp_path_factory.mktemp("encode")
    cities = ["Lyon", "Porto", "Graz", "Turku", "Brno", "Cork", "Ghent", "Split", "Malmo", "Bergen"]
    docs = [{"id": f"doc{i}", "text": f"{cities[i % 10]} number {i} is a city in region {i % 7}. It has a "
             f"population of {1000 + 37 * i} people and lies in time zone {i % 5}. " * 2} for i in range(80)]
    corpus = root / "corpus.jsonl"
    lines = [json.dumps(d) for d in docs]
    lines.insert(17, "{this line is not json")
    corpus.write_text("\n".join(lines) + "\n")
    cfg = ModelConfig.from_name("tiny")
    tokenizer = Tokenizer.train([d["text"] for d in docs], vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "ckpt", Transformer(cfg).eval(), tokenizer)
    return {"corpus": corpus, "checkpoint": checkpoint, "bank": root / "bank"}


def test_nodes_are_separate_processes_with_their_own_resources(cluster):
    assert cluster.alive_nodes() == 2
    nodes = cluster._get_json("/api/v0/nodes?limit=10&detail=true")["data"]["result"]["result"]
    resources = sorted((n["resources_total"]["CPU"], n["resources_total"]["memory"]) for n in nodes)
    assert resources == [(1.0, 3 * 1024**3)] * 2  # explicit per node: RAM is not counted twice
    assert len(set(cluster.pids)) == 2 and all(os.getpgid(p) == p for p in cluster.pids)
    assert all(str(cluster.temp_dir) in Path(f"/proc/{p}/cmdline").read_text() for p in cluster.pids)


def test_encode_job_via_ray_job_submit(cluster, encode_inputs):
    """`ray job submit` ships the repo as working_dir; the encoder actors export throughput while the job runs.
    Two 0.5-CPU actors on two 1-CPU nodes: the rest of the job must fit beside them and both must get parts."""
    job_id = f"memory3-encode-{uuid.uuid4().hex[:8]}"
    address = ["--address", cluster.dashboard_url]
    submitted = run([RAY, "job", "submit", *address, "--submission-id", job_id, "--no-wait",
                     "--runtime-env", "infra/runtime_env.local.yaml", "--",
                     "memory3", "encode", f"corpus={encode_inputs['corpus']}", f"bank={encode_inputs['bank']}",
                     f"checkpoint={encode_inputs['checkpoint']}", "shard_documents=10", "actors=2",
                     "actor_num_cpus=0.5", "task_num_cpus=0.25", "batch_size=16"])
    assert submitted.returncode == 0, submitted.stderr[-3000:]

    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {TOKEN}"})
    seen: dict[str, float] = {}
    deadline = time.time() + 300
    while (status := jobs.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, f"job still {status}:\n{jobs.get_job_logs(job_id)[-3000:]}"
        for name, value in scrape(cluster).items():  # while the job runs, as a Prometheus scrape would
            seen[name] = max(seen.get(name, 0.0), value)
        time.sleep(1)
    for name, value in scrape(cluster).items():
        seen[name] = max(seen.get(name, 0.0), value)

    logs = run([RAY, "job", "logs", *address, job_id]).stdout
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    state = run([RAY, "job", "status", *address, "--log-color", "false", job_id])
    assert f"Job '{job_id}' succeeded" in state.stdout, state.stdout
    summary = json.loads(next(line for line in logs.splitlines() if line.startswith('{"bank"')))
    assert summary["encoded_references"] > 0 and summary["errors"] == 1, summary
    # Both fractional actors were scheduled beside the read/chunk tasks (no deadlock on 1-CPU nodes). Which actor
    # gets which part is Ray Data's choice: it promises no actor a part, so only those that got one report time.
    actors = cluster._get_json("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
    encoders = [a for a in actors if "EncodeShards" in a.get("class_name", "")]
    assert len(encoders) == 2, [(a.get("class_name"), a.get("state")) for a in actors]
    busy = summary["encoder_busy_seconds"]
    assert 1 <= len(busy) <= 2 and all(s > 0 for s in busy.values()), busy

    # The code that ran is the uploaded working directory, not this checkout's installed package.
    info = jobs.get_job_info(job_id)
    assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")

    verify = run([MEMORY3, "bank", "verify", f"bank={encode_inputs['bank']}"])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout.strip().splitlines()[-1]).get("ok", True)

    # Throughput was scrapeable from the nodes' Prometheus endpoints (ray_ prefix, counters keep their _total).
    assert 0 < seen.get("memory3_encode_references_total", 0) <= summary["encoded_references"], seen
    assert seen.get("memory3_encode_tokens_total", 0) > 0, seen
    assert seen.get("memory3_encode_bytes_written_total", 0) > 0, seen
    assert seen.get("memory3_encode_references_per_second", 0) > 0, seen


def test_clients_without_the_token_are_refused(cluster):
    """docs/cluster.md, "Auth": the job API needs the token; the Prometheus port does not."""
    anonymous = run([RAY, "job", "list", "--address", cluster.dashboard_url], env=client_env(RAY_AUTH_MODE="disabled"))
    assert anonymous.returncode != 0 and "auth" in (anonymous.stdout + anonymous.stderr).lower()
    wrong = urllib.request.Request(f"{cluster.dashboard_url}/api/jobs/", headers={"Authorization": "Bearer " + "0" * 64})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused.value.code in (401, 403)
    # (the CLI with the token: test_encode_job_via_ray_job_submit's submit/status/logs)
    for url in cluster.metrics_urls:
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
