"""`ray job submit` of the smoke training to a real two-node cluster started with `ray start`
on 127.0.0.1; the cluster is stopped afterwards by its own process ids (never `ray stop`, which
would kill every Ray cluster on the host)."""

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.ray  # clusters of their own, in other processes

# the tools of the interpreter running the tests, never whatever is first on PATH: the suite must
# pass whether or not its environment is activated (jobs name `sys.executable` for the same reason)
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1, from 20000-32767: above the range Ray gives its
    workers (10002-19999) and below the kernel's ephemeral range (32768+), from which the OS
    hands ports to every `bind(0)` and outgoing connection, Ray's own included, that could
    otherwise take a port picked here before the node binds it."""
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        for port in random.sample(range(20000, 32768), 200):
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"fewer than {count} free ports in 20000-32767")


def _our_processes(marker: str) -> list[int]:
    """Every process whose command line names this cluster's private temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _alive_nodes(address: str) -> int:
    try:
        with urllib.request.urlopen(f"{address}/nodes?view=summary", timeout=5) as r:
            summary = json.loads(r.read())["data"]["summary"]
        return sum(1 for n in summary if n["raylet"]["state"] == "ALIVE")
    except (OSError, KeyError, ValueError):
        return 0


class _Cluster:
    """A head (2 CPUs) and then a second node (1 CPU) on 127.0.0.1 from `ray start`, each
    advertising one `raydiff_slot`, every node in its own process group so that it can be
    killed by group. Each node's `ray start` output goes to a log in the cluster's temp dir."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rdj", dir="/tmp")  # short: socket paths are capped
        # the agents' defaults (52365, ...) are taken whenever another Ray runs on the host, such
        # as the test session's, and a node whose dashboard agent cannot bind accepts no jobs
        (self.gcs_port, self.dashboard_port, client_port, *self._agent_ports) = _free_ports(11)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self.nodes: list[subprocess.Popen] = []
        self._start_node(
            "--head", f"--port={self.gcs_port}", "--num-cpus=2", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}", f"--ray-client-server-port={client_port}")

    def _start_node(self, *args: str) -> subprocess.Popen:
        ports = [self._agent_ports.pop() for _ in range(4)]
        with open(Path(self.temp_dir) / f"ray-start-{len(self.nodes)}.log", "w") as log:
            node = subprocess.Popen(
                [RAY, "start", "--block", "--node-ip-address=127.0.0.1", *args,
                 f"--dashboard-agent-listen-port={ports[0]}",
                 f"--dashboard-agent-grpc-port={ports[1]}", f"--metrics-export-port={ports[2]}",
                 f"--runtime-env-agent-port={ports[3]}", '--resources={"raydiff_slot": 1}'],
                env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        self.nodes.append(node)
        return node

    def failure(self, node: int = 0) -> str:
        """The exception line of the node's `ray start` output (else its last line)."""
        lines = (Path(self.temp_dir) / f"ray-start-{node}.log").read_text(
            errors="replace").strip().splitlines()
        errors = [line for line in lines if re.match(r"\w+(Error|Exception): ", line)]
        return (errors or lines or ["(no output)"])[-1]

    def wait_for_head(self, timeout: float = 180) -> bool:
        """True once the dashboard answers; False when the head exits first."""
        deadline = time.monotonic() + timeout  # slow when the host is busy
        while self.nodes[0].poll() is None:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return True
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the Ray head did not come up in time") from None
                time.sleep(1)
        return False

    def add_node(self, timeout: float = 90) -> None:
        node = self._start_node(f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=1")
        deadline = time.monotonic() + timeout
        while _alive_nodes(self.address) < 2:
            if time.monotonic() > deadline or node.poll() is not None:
                raise RuntimeError(f"the second Ray node did not join: {self.failure(1)}")
            time.sleep(1)

    def stop(self) -> None:
        # SIGTERM lets the raylet and GCS stop cleanly; `ray start --block` itself outlives it
        # (measured: still running after 60 s), so its group is killed after a short grace
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        # anything that left the process groups: it names the temp dir or the GCS address
        for pid in (_our_processes(self.temp_dir)
                    + _our_processes(f"127.0.0.1:{self.gcs_port}")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ray_cluster():
    """A running two-node cluster. A head that exits while starting is retried with fresh ports
    (a port found free can still be taken before Ray binds it); the error names the reason from
    `ray start`'s own output."""
    for _attempt in range(3):
        cluster = _Cluster()
        try:
            if cluster.wait_for_head():
                break
        except BaseException:
            cluster.stop()
            raise
        cluster.stop()
    else:
        raise RuntimeError(f"the Ray head exited three times; last: {cluster.failure()}")
    try:
        cluster.add_node()
        yield {"address": cluster.address, "env": cluster.env}
    finally:
        cluster.stop()


@pytest.mark.timeout(420)
def test_job_submit_trains_checkpoints_and_spreads_workers_over_two_nodes(ray_cluster, tmp_path):
    """`python -m raydiff.train` as a job: it succeeds, reports and checkpoints. Each node
    advertises one raydiff_slot and each worker asks for one: the two DDP workers can only run
    one per node."""
    out, data = tmp_path / "runs", tmp_path / "data"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", ray_cluster["address"], "--working-dir", str(ROOT),
         "--", sys.executable, "-m", "raydiff.train", "--config", "configs/smoke.yaml",
         f"train.output_dir={out}", f"data.out_dir={data}", "train.max_steps=20",
         "train.eval_every=20", "train.checkpoint_every=20", "train.log_every=10",
         "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.worker_resources.raydiff_slot=1"],
        env=ray_cluster["env"], capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout.lower()
    workers = json.loads((out / "smoke" / "workers.json").read_text())
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2  # one worker on each node
    assert (out / "smoke" / "step_00000020" / "state.pt").exists()
    steps = [json.loads(line)["step"] for line in (out / "smoke" / "metrics.jsonl").open()]
    assert steps == [10, 20]
