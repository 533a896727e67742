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


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rdj", dir="/tmp")  # short: Ray's socket paths are capped
    gcs_port, dashboard_port = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise RuntimeError("the Ray head did not come up") from None
                time.sleep(1)
        yield {"address": address, "env": env}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        for pid in _our_processes(temp_dir):  # anything that left the process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


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
