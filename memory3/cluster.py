"""A multi-node Ray cluster on one machine, for development and tests: `python -m memory3.cluster up|down|status`.

Every node is its own `ray start --block` process (one head, N workers), so jobs submitted with `ray job submit`
cross real node boundaries: the driver runs on the head, tasks and actors spread over the nodes, objects travel
between object stores, and each node exports its own Prometheus metrics. What keeps it from clashing with the
other Ray instances on the same box:
- its own temp dir, one `--temp-dir` per node below it (<temp_dir>/node-<i>: sessions, sockets, logs, unpacked
  runtime envs), as if each node were its own machine. Nodes sharing one --temp-dir would share one session dir,
  and a worker node unpacking a job's working_dir there deletes and rewrites the copy the head's driver runs in;
- explicit ports, so `ray.init()` elsewhere never joins it;
- `--num-cpus`, `--memory` and `--object-store-memory` per node, since each node would otherwise claim all of
  the machine's RAM and two nodes on one box would count it twice;
- `down` ends only the process groups that `up` started (recorded in <temp_dir>/memory3-cluster.json), never a
  global `ray stop`, which would kill every Ray process on the machine.

Auth (Ray 2.60 turns token auth on by default): the dev cluster runs with RAY_AUTH_MODE=disabled, so
`ray job submit` from another shell needs no token. The dashboard/job API listens on 127.0.0.1 only, but Ray binds
the GCS and metrics ports to every interface (it resolves 127.0.0.1 to the machine's address): on a machine others
can reach, start it with `--token-auth` (the token of ~/.ray/auth_token). Real clusters keep auth on
(docs/cluster.md).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "memory3-cluster.json"
GiB = 1024**3


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """One head and `workers` worker nodes on this machine; every port explicit so two clusters never collide."""

    temp_dir: str = "/tmp/memory3-ray"  # short on purpose: Ray's unix sockets live below it (108-byte limit)
    workers: int = 1  # worker nodes besides the head
    num_cpus: int = 1  # CPUs each node advertises
    memory: int = 4 * GiB  # bytes of task/actor memory each node advertises
    object_store_memory: int = 1 * GiB  # bytes of shared-memory object store per node
    gcs_port: int = 6379  # head's GCS: the address workers and drivers join (127.0.0.1:<gcs_port>)
    dashboard_port: int = 8265  # dashboard + job submission REST API on 127.0.0.1
    client_server_port: int = 10001  # Ray Client (ray://) on the head
    metrics_ports: list[int] = field(default_factory=list)  # Prometheus export port per node, head first
    agent_ports: list[int] = field(default_factory=list)  # dashboard agent HTTP port per node, head first
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every node (e.g. RAY_* settings)
    stop_with_parent: bool = False  # nodes get SIGTERM when the process that started them dies (tests; Linux)
    pids: list[int] = field(default_factory=list)  # `ray start --block` process per node, head first

    @classmethod
    def on_free_ports(cls, temp_dir: str, workers: int = 1, **kwargs) -> "LocalCluster":
        """A cluster whose every port is currently free: for tests that run beside other Ray instances."""
        n = workers + 1
        return cls(temp_dir=temp_dir, workers=workers, gcs_port=free_port(), dashboard_port=free_port(),
                   client_server_port=free_port(), metrics_ports=[free_port() for _ in range(n)],
                   agent_ports=[free_port() for _ in range(n)], **kwargs)

    # -- addresses -------------------------------------------------------------------------------------------
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}/metrics" for p in self.metrics_ports]

    @property
    def state_path(self) -> Path:
        return Path(self.temp_dir) / STATE_FILE

    # -- lifecycle -------------------------------------------------------------------------------------------
    def node_env(self) -> dict[str, str]:
        """The nodes' environment: auth off unless `env` turns it on, this venv's bin first so `memory3` resolves."""
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)  # a node must never join some other cluster
        env["RAY_AUTH_MODE"] = "disabled"
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain for: `down` ends nodes at once
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env.update(self.env)
        return env

    def node_temp_dir(self, index: int) -> str:
        """Node `index`'s own Ray temp dir (0 = head); short, since Ray's unix sockets live below it."""
        return f"{self.temp_dir}/node-{index}"

    def _ray_start(self, index: int) -> list[str]:
        ray = str(Path(sys.executable).with_name("ray"))
        common = [ray, "start", "--block", "--disable-usage-stats",
                  f"--temp-dir={self.node_temp_dir(index)}", f"--num-cpus={self.num_cpus}", f"--memory={self.memory}",
                  f"--object-store-memory={self.object_store_memory}",
                  f"--metrics-export-port={self.metrics_ports[index]}",
                  f"--dashboard-agent-listen-port={self.agent_ports[index]}"]
        if index == 0:
            return common + ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={self.client_server_port}"]
        return common + [f"--address={self.gcs_address}"]

    def up(self, timeout: float = 180.0) -> "LocalCluster":
        """Start the head, then the workers; return once every node is alive and the job API answers."""
        if self.state_path.exists() and any(_is_ours(pid, self.temp_dir) for pid in self.read_state().pids):
            raise RuntimeError(f"a cluster already runs in {self.temp_dir}: `python -m memory3.cluster down` first")
        n = self.workers + 1
        self.metrics_ports = self.metrics_ports or [free_port() for _ in range(n)]
        self.agent_ports = self.agent_ports or [free_port() for _ in range(n)]
        if len(self.metrics_ports) != n or len(self.agent_ports) != n:
            raise ValueError(f"need {n} metrics_ports and agent_ports (one per node), got "
                             f"{self.metrics_ports} and {self.agent_ports}")
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        env = self.node_env()
        deadline = time.time() + timeout
        self.pids, procs = [], []
        try:
            for index in range(n):
                with open(Path(self.temp_dir) / f"node-{index}.out", "ab") as log:  # `ray start`'s own output
                    # A new session makes each node a process group that `down` can end without touching others.
                    procs.append(subprocess.Popen(self._ray_start(index), env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True,
                                                  preexec_fn=_term_when_parent_dies if self.stop_with_parent else None))
                self.pids.append(procs[-1].pid)
                self.write_state()
                if index == 0:
                    self._wait(self._job_api_ready, procs, deadline, "the head's job API")
            self._wait(lambda: self.alive_nodes() >= n, procs, deadline, f"{n} alive nodes")
        except BaseException:
            self.down()
            raise
        return self

    def down(self, grace: float = 20.0) -> None:
        """SIGTERM each node we started (workers first; each drains and ends its own Ray processes), then
        SIGKILL whatever is left of those process groups. Nothing outside them is touched."""
        pids = self.pids or (self.read_state().pids if self.state_path.exists() else [])
        ours = [pid for pid in pids if _is_ours(pid, self.temp_dir)]  # checked once, before anything exits
        for pid in reversed(ours):
            _signal_group(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and any(_group_members(pid) for pid in ours):
            time.sleep(0.2)
        for pid in ours:
            _signal_group(pid, signal.SIGKILL)
        self.pids = []
        self.state_path.unlink(missing_ok=True)

    # -- state -----------------------------------------------------------------------------------------------
    def write_state(self) -> None:
        self.state_path.write_text(json.dumps({k: v for k, v in asdict(self).items() if k != "env"}, indent=2))

    def read_state(self) -> "LocalCluster":
        return LocalCluster(**json.loads(self.state_path.read_text()))

    # -- probes ----------------------------------------------------------------------------------------------
    def _get_json(self, path: str, timeout: float = 5.0):
        """GET from the dashboard; with token auth (RAY_AUTH_TOKEN in env) as a Bearer token, like Ray's SDK."""
        request = urllib.request.Request(f"{self.dashboard_url}{path}")
        token = self.env.get("RAY_AUTH_TOKEN")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.load(r)

    def _job_api_ready(self) -> bool:
        try:
            self._get_json("/api/version", timeout=2)
            return True
        except (OSError, ValueError):
            return False

    def alive_nodes(self) -> int:
        """Alive nodes as the GCS sees them (the dashboard's state API)."""
        try:
            nodes = self._get_json("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except (OSError, KeyError, ValueError):
            return 0
        return sum(node.get("state") == "ALIVE" for node in nodes)

    def _wait(self, ready, procs: list[subprocess.Popen], deadline: float, what: str) -> None:
        while not ready():
            for index, proc in enumerate(procs):
                if proc.poll() is not None:
                    log = (Path(self.temp_dir) / f"node-{index}.out").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"Ray node {index} exited with status {proc.returncode} while waiting for "
                                       f"{what}; its `ray start` output ends:\n{log}")
            if time.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; see {self.temp_dir}/node-*.out and the logs "
                                   f"under {self.temp_dir}/node-*/session_latest/logs")
            time.sleep(0.5)


def _is_ours(pid: int, temp_dir: str) -> bool:
    """Alive, and really a `ray start` of this cluster (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "start" in cmdline and f"--temp-dir={temp_dir}/node-" in cmdline


def _term_when_parent_dies() -> None:
    """In the child before exec: SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), so a test killed
    before its teardown does not leave a cluster behind."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    defaults = LocalCluster()
    parser = argparse.ArgumentParser(prog="python -m memory3.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--temp-dir", default=defaults.temp_dir, help="Ray's session/log/socket root for this cluster")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="worker nodes besides the head")
    parser.add_argument("--num-cpus", type=int, default=defaults.num_cpus, help="CPUs each node advertises")
    parser.add_argument("--memory", type=int, default=defaults.memory, help="bytes of memory each node advertises")
    parser.add_argument("--object-store-memory", type=int, default=defaults.object_store_memory,
                        help="bytes of object store per node")
    parser.add_argument("--port", type=int, default=defaults.gcs_port, help="the head's GCS port")
    parser.add_argument("--dashboard-port", type=int, default=defaults.dashboard_port, help="dashboard/job API port")
    parser.add_argument("--token-auth", action="store_true",
                        help="RAY_AUTH_MODE=token with ~/.ray/auth_token (`ray get-auth-token --generate` makes one)")
    args = parser.parse_args(argv)
    token_file = Path.home() / ".ray" / "auth_token"
    if args.token_auth and not token_file.is_file():
        parser.error(f"--token-auth needs a token in {token_file}: run `ray get-auth-token --generate`")
    token = {"RAY_AUTH_TOKEN": token_file.read_text().strip()} if token_file.is_file() else {}
    env = {"RAY_AUTH_MODE": "token", **token} if args.token_auth else {}
    cluster = LocalCluster(temp_dir=args.temp_dir, workers=args.workers, num_cpus=args.num_cpus,
                           memory=args.memory, object_store_memory=args.object_store_memory, gcs_port=args.port,
                           dashboard_port=args.dashboard_port, env=env)
    if args.action == "down":
        cluster.down()
        print(f"stopped the cluster in {args.temp_dir}")
        return 0
    if args.action == "status":
        if not cluster.state_path.exists():
            print(f"no cluster in {args.temp_dir}")
            return 1
        cluster = cluster.read_state()
        cluster.env = token  # lets `status` query a --token-auth cluster; a no-auth dashboard ignores it
        print(json.dumps({"dashboard": cluster.dashboard_url, "gcs_address": cluster.gcs_address,
                          "alive_nodes": cluster.alive_nodes(), "metrics": cluster.metrics_urls}, indent=2))
        return 0
    cluster.up()
    print(f"Ray cluster up: {cluster.workers + 1} nodes, dashboard {cluster.dashboard_url}\n"
          f"  submit:  ray job submit --address {cluster.dashboard_url} "
          f"--runtime-env infra/runtime_env.local.yaml -- memory3 encode ...\n"
          f"  metrics: {' '.join(cluster.metrics_urls)}\n"
          f"  stop:    python -m memory3.cluster down --temp-dir {cluster.temp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
