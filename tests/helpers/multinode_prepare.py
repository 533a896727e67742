"""Run by tests/test_multinode.py in its own process (the test session's Ray is a different
cluster): a `ray.cluster_utils.Cluster` with a CPU-less head (the driver) and two worker nodes,
`prepare` of a corpus on it, then Ray's State API: which nodes ran the tasks of each operator.
Prints one JSON line."""

import json
import socket
import sys
import time
from collections import defaultdict

import ray
from ray.cluster_utils import Cluster
from ray.data import DataContext
from ray.util.state import list_tasks

from raydiff.config import load_config
from raydiff.data.pipeline import prepare
from raydiff.runtime import idle_workers_kept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> dict:
    # the defaults are taken whenever another Ray runs on the host (the test session's)
    return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port()}


def finished_tasks(timeout_s: float = 60) -> dict[str, set[str]]:
    """{task name: node ids} of every finished task, once Ray's task events (reported a
    second or so after the fact) include the last stage and stop changing."""
    deadline, previous = time.monotonic() + timeout_s, None
    while True:
        ran_on = defaultdict(set)
        for task in list_tasks(limit=10_000, raise_on_missing_output=False):
            if task.state == "FINISHED":
                ran_on[task.name].add(task.node_id)
        snapshot = {name: len(ids) for name, ids in ran_on.items()}
        if (snapshot == previous and any("Write" in n for n in ran_on)) \
                or time.monotonic() > deadline:
            return ran_on
        previous = snapshot
        time.sleep(2)


def main(source: str, out_dir: str, *overrides: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port(),
        "_system_config": {"num_workers_soft_limit": idle_workers_kept(2)}, **agent_ports()})
    try:
        nodes = [cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20, **agent_ports())
                 for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        DataContext.get_current().enable_progress_bars = False
        cfg = load_config(None, [f"data.source={source}", f"data.out_dir={out_dir}", *overrides])
        prepared = prepare(cfg.data)
        ran_on = finished_tasks()
        print(json.dumps({"path": prepared.path, "worker_nodes": [n.node_id for n in nodes],
                          "head": cluster.head_node.node_id,
                          "ran_on": {name: sorted(ids) for name, ids in ran_on.items()}}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
