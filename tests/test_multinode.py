"""Training across nodes: a `ray.cluster_utils.Cluster` with two worker nodes that carry
different custom resources; one DDP worker lands on each and training proceeds."""

import json
import math
import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(420)
def test_workers_land_on_both_nodes_and_train(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               # short: Ray's socket paths are capped
               RAY_TMPDIR=tempfile.mkdtemp(prefix="rdm", dir="/tmp"), PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.multinode_run", str(ROOT / "configs" / "smoke.yaml"),
         str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {w["node_id"] for w in result["workers"]} == set(result["node_ids"].values())
    assert result["step"] == 10 and math.isfinite(result["loss"])
    assert result["checkpoint"].endswith("step_00000010")
