"""`ray job submit` of the smoke training to a real head node started with `ray start` on
127.0.0.1; the cluster is stopped afterwards by its own process ids (never `ray stop`, which
would kill every Ray cluster on the host)."""

import contextlib
import json
import os
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

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _node_ports() -> list[str]:
    """Free ports for a node's agents: the defaults (52365, ...) are taken whenever another Ray
    runs on the host, such as the test session's, and a node whose dashboard agent cannot bind
    accepts no jobs ("No available agent to submit job")."""
    return [f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}"]


def _start_cluster():
    """A head (2 CPUs) and optionally a second node (1 CPU) on 127.0.0.1, each advertising one
    `raydiff_slot`, every process in its own session so that it can be killed by group."""
    temp_dir = tempfile.mkdtemp(prefix="rdj", dir="/tmp")  # short: Ray's socket paths are capped
    gcs_port, dashboard_port = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    nodes = [subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
         f"--ray-client-server-port={_free_port()}", *_node_ports(),
         '--resources={"raydiff_slot": 1}'],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    return temp_dir, gcs_port, dashboard_port, env, nodes


@pytest.fixture(params=[False], ids=["head"])
def ray_head(request):
    temp_dir, gcs_port, dashboard_port, env, nodes = _start_cluster()
    head = nodes[0]
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 180  # slow when the host is busy
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise RuntimeError("the Ray head did not come up") from None
                time.sleep(1)
        if request.param:  # a second node with its own slot, joining the head
            nodes.append(subprocess.Popen(
                [RAY, "start", "--block", f"--address=127.0.0.1:{gcs_port}",
                 "--node-ip-address=127.0.0.1", "--num-cpus=1", *_node_ports(),
                 '--resources={"raydiff_slot": 1}'],
                env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 90
            while _alive_nodes(address) < 2:
                if time.monotonic() > deadline or nodes[1].poll() is not None:
                    raise RuntimeError("the second Ray node did not join")
                time.sleep(1)
        yield {"address": address, "env": env}
    finally:
        # SIGTERM lets the raylet and GCS stop cleanly; `ray start --block` itself outlives it
        # (measured: still running after 60 s), so its group is killed after a short grace
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        # anything that left the process groups: it names the temp dir or the GCS address
        for pid in _our_processes(temp_dir) + _our_processes(f"127.0.0.1:{gcs_port}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive_nodes(address: str) -> int:
    try:
        with urllib.request.urlopen(f"{address}/nodes?view=summary", timeout=5) as r:
            summary = json.loads(r.read())["data"]["summary"]
        return sum(1 for n in summary if n["raylet"]["state"] == "ALIVE")
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.timeout(420)
def test_job_submit_trains_and_checkpoints(ray_head, tmp_path):
    out, data = tmp_path / "runs", tmp_path / "data"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["address"], "--working-dir", str(ROOT),
         "--", "python", "-m", "raydiff.train", "--config", "configs/smoke.yaml",
         f"train.output_dir={out}", f"data.out_dir={data}", "train.max_steps=20",
         "train.eval_every=20", "train.checkpoint_every=20", "train.log_every=10"],
        env=ray_head["env"], capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout.lower()
    assert (out / "smoke" / "step_00000020" / "state.pt").exists()
    steps = [json.loads(line)["step"] for line in (out / "smoke" / "metrics.jsonl").open()]
    assert steps == [10, 20]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("ray_head", [True], ids=["two-nodes"], indirect=True)
def test_job_submit_spreads_workers_over_two_nodes(ray_head, tmp_path):
    """Each node advertises one raydiff_slot and each worker asks for one: the two DDP workers
    can only run one per node."""
    out, data = tmp_path / "runs", tmp_path / "data"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["address"], "--working-dir", str(ROOT),
         "--", "python", "-m", "raydiff.train", "--config", "configs/smoke.yaml",
         f"train.output_dir={out}", f"data.out_dir={data}", "train.max_steps=10",
         "train.eval_every=10", "train.checkpoint_every=10", "train.log_every=10",
         "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.worker_resources.raydiff_slot=1"],
        env=ray_head["env"], capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = json.loads((out / "smoke" / "workers.json").read_text())
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2  # one worker on each node
    assert (out / "smoke" / "step_00000010" / "state.pt").exists()
