"""Elastic training under preemption and node loss, on a real multi-node Ray cluster of this host.

    python scripts/bench_elastic.py [--max-steps 600] [--out DIR] [--quick]

Starts a `ray.cluster_utils.Cluster` (a CPU-less head and two worker nodes, each with one
`raydiff_slot`, so that one worker lands per node) and trains `configs/smoke.yaml` with
`ray.num_workers=[1, 2]`, while three things happen to it:

1. graceful preemption: SIGTERM to the worker on node B (a spot notice); the group checkpoints
   at the next step and restarts (node B stays, so at the same size);
2. hard loss: node B removed without grace (its processes SIGKILLed); the group restarts at
   world size 1 from the latest checkpoint;
3. node C added: after `ray.elastic_resize_interval_s` the group grows back to 2 (the workers
   hold before each step, `debug.hold_file`, from the node's arrival until the grown group has
   started, so that the run cannot end before it grows, however long a group takes to start).

Prints one JSON object: per event, the seconds from the event to the new group's first step,
the steps repeated and tokens/s before, during and after (from the run's metrics.jsonl and
resizes.jsonl), and the run directory. `--quick` paces tiny steps with `debug.step_sleep_s`
(tokens/s then mean nothing), prepares the data in one process and has the GCS detect a dead
node in about 1.5 s, so that tests/test_elastic.py can check the behaviour in a minute or two.
Ray Train waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (set to 15 s here, 60 s by default)
before giving up on a group size the cluster no longer has: a lost node still counts
in Ray's resource view until its death is detected. The controller polls the workers every
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (0.25 s here, 2 s by default), and a worker's report waits
for the poll: this run reports every step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
# a worker's report waits until the controller's next poll (every 2 s by default): reporting
# every step, as here, would otherwise pace the steps at 2 s
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args() -> dict:
    """A worker node: 2 logical CPUs (a 0.5-CPU worker and Ray Data's reads), one slot, and
    ports of its own (the defaults clash with any other Ray on the host)."""
    return {"num_cpus": 2, "resources": {"raydiff_slot": 1},
            "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port()}


def rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition, what: str, timeout_s: float, failed: threading.Event) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if failed.is_set():
            raise RuntimeError(f"the run ended while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.1)


def summarise(event: str, at: float, run_dir: Path) -> dict:
    """One event's figures from the run's files: the first worker group that started after
    `at`, the resize row that names it, and tokens/s of the groups around it."""
    reports = [r for r in rows(run_dir / "metrics.jsonl") if "loss" in r]
    groups: dict[float, list[dict]] = {}
    for r in reports:
        groups.setdefault(r["group_started_at"], []).append(r)
    starts = sorted(groups)
    new = next(s for s in starts if s > at)
    old = starts[starts.index(new) - 1]
    later = starts[starts.index(new) + 1] if starts.index(new) + 1 < len(starts) else None
    change = next(c for c in rows(run_dir / "resizes.jsonl")
                  if c["step"] == groups[new][0]["resumed_from"]
                  and c["new_world_size"] == groups[new][0]["world_size"])

    def tokens_per_s(start):
        values = [r["tokens_per_s"] for r in groups[start][1:]] if start is not None else []
        return round(statistics.median(values), 1) if values else None

    return {"event": event, "world_size": [change["old_world_size"], change["new_world_size"]],
            "seconds_to_resume": round(new - at, 2), "steps_repeated": change["steps_repeated"],
            "resumed_from_step": change["step"],
            "tokens_per_s": {"before": tokens_per_s(old), "during": tokens_per_s(new),
                             "after": tokens_per_s(later)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--out", default=None, help="run and data directory (default: a temp dir)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny paced steps: checks the behaviour, measures no speed")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rde", dir="/tmp"))

    import ray
    from ray.cluster_utils import Cluster

    from raydiff.config import load_config
    from raydiff.data.local import prepare_local
    from raydiff.train.trainer import train_on_ray

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-elastic-")).resolve()
    steps, every = (40, 5) if args.quick else (args.max_steps, args.checkpoint_every)
    log_every = 1 if args.quick else 10  # each report waits for the controller's next poll
    # reports each phase trains before the next event: 7 puts the node loss between checkpoints
    phase = 7
    overrides = [
        "ray.num_workers=[1, 2]", "ray.cpus_per_worker=0.5", "ray.worker_resources.raydiff_slot=1",
        "ray.elastic_resize_interval_s=2", "ray.max_failures=10", "ray.cache_train_split=false",
        "train.num_threads=1", f"train.max_steps={steps}", f"train.log_every={log_every}",
        f"train.checkpoint_every={every}", f"train.eval_every={steps}",
        f"data.out_dir={out}/data", f"train.output_dir={out}/runs",
        f"debug.hold_file={out}/hold"]
    if args.quick:
        overrides += ["debug.step_sleep_s=0.3", "data.synthetic_size=400"]
    else:  # an epoch of ~1,000 steps: the streamed split's restart at each epoch stays rare
        overrides += ["data.synthetic_size=20000", "model.hidden_size=128",
                      "model.intermediate_size=512",
                      "model.num_layers=2", "train.batch_size=64"]

    # --quick: the GCS declares a dead node dead after 3 missed checks 0.5 s apart (Ray's
    # defaults: 5 at 3 s, 15 s or more with the node gone)
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(), "runtime_env_agent_port": free_port(),
        **({"_system_config": system} if args.quick else {})})
    result: dict = {}
    try:
        nodes = [cluster.add_node(**node_args()) for _ in range(2)]
        cluster.wait_for_nodes()
        cfg = load_config(ROOT / "configs" / "smoke.yaml",
                          [f"ray.address={cluster.address}", *overrides])
        if args.quick:  # the data in one process: a fresh cluster's first Ray Data run is slow
            prepare_local(cfg.data)
        run_dir = out / "runs" / cfg.train.run_name
        metrics = run_dir / "metrics.jsonl"
        ended = threading.Event()

        def fit():
            try:
                result["run"] = train_on_ray(cfg)
            except BaseException as error:  # reported by the main thread
                result["error"] = error
            finally:
                ended.set()

        threading.Thread(target=fit, name="fit", daemon=True).start()

        def trained(world_size: int, at_least: int, since: float = 0.0):
            return lambda: sum(r.get("world_size") == world_size and "loss" in r
                               and r["group_started_at"] > since
                               for r in rows(metrics)) >= at_least

        events = []
        wait_for(trained(2, phase), "training at world size 2", 300, ended)
        node_b = nodes[1].node_id
        first_group = json.loads((run_dir / "workers.json").read_text())
        victim = next(w for w in first_group if w["node_id"] == node_b)
        events.append(("graceful preemption (SIGTERM, node kept)", time.time()))
        os.kill(victim["pid"], signal.SIGTERM)
        wait_for(trained(2, phase, since=events[-1][1]),
                 "training again after the preemption", 300, ended)

        events.append(("hard loss (node removed, SIGKILL)", time.time()))
        cluster.remove_node(nodes[1], allow_graceful=False)
        wait_for(trained(1, phase), "training at world size 1", 300, ended)

        placement = run_dir / "workers.json"

        def group_of(size: int):  # the pids of the group workers.json names, if of that size
            workers = json.loads(placement.read_text())
            return {w["pid"] for w in workers} if len(workers) == size else set()

        small = group_of(1)
        (out / "hold").touch()
        events.append(("node added (grow back)", time.time()))
        cluster.add_node(**node_args())
        wait_for(lambda: group_of(2) - small, "the group to grow back to 2", 300, ended)
        (out / "hold").unlink()
        wait_for(ended.is_set, "the run to finish", 600, threading.Event())
        if "error" in result:
            raise result["error"]
        print(json.dumps({"run_dir": str(run_dir), "max_steps": steps,
                          "first_group_nodes": len({w["node_id"] for w in first_group}),
                          "final_step": result["run"].metrics.get("step"),
                          "events": [summarise(name, at, run_dir) for name, at in events]},
                         indent=1))
    finally:
        ray.shutdown()  # the driver first: the cluster refuses to remove the node it is on
        cluster.shutdown()


if __name__ == "__main__":
    main()
