"""Run by tests/test_multinode.py in its own process (the test session's Ray is a different
cluster): a `ray.cluster_utils.Cluster` with a CPU-less head and two worker nodes that carry
different custom resources and labels (an "A40" node and a "T4" node), and a 2-worker smoke
training that must place one worker on each. Prints one JSON line."""

import json
import socket
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from raydiff.config import load_config
from raydiff.train.trainer import train_on_ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> dict:
    # the defaults are taken whenever another Ray runs on the host (the test session's)
    return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port()}


def main(config: str, out_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **agent_ports()})
    try:
        # 2 logical CPUs a node: a worker holds 0.5 and Ray Data's read tasks need a whole one
        nodes = {gpu: cluster.add_node(num_cpus=2, labels={"raydiff.io/gpu": gpu},
                                       resources={"raydiff_slot": 1, f"node_{gpu}": 1},
                                       **agent_ports())
                 for gpu in ("A40", "T4")}
        cluster.wait_for_nodes()
        cfg = load_config(config, [
            f"ray.address={cluster.address}", "ray.num_workers=2", "ray.cpus_per_worker=0.5",
            "ray.worker_resources.raydiff_slot=1", "train.max_steps=10", "train.log_every=5",
            "train.eval_every=10", "train.checkpoint_every=10",
            "data.synthetic_size=200",
            "ray.cache_train_split=false",  # streamed from Parquet (the other tests cache it)
            f"data.out_dir={out_dir}/data", f"train.output_dir={out_dir}/runs"])
        run = train_on_ray(cfg)
        print(json.dumps({
            "node_ids": {gpu: node.node_id for gpu, node in nodes.items()},
            "workers": json.loads((run.run_dir / "workers.json").read_text()),
            "step": run.metrics.get("step"), "loss": run.metrics.get("loss"),
            "checkpoint": str(run.last_checkpoint)}))
    finally:
        ray.shutdown()  # the driver first: the cluster refuses to remove the node it is on
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], str(Path(sys.argv[2]).resolve()))
