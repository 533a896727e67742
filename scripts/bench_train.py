#!/usr/bin/env python
"""Distributed training throughput on this machine's CPUs, printed as JSON.

- ray_overhead: tokens/s of Ray Train with one worker vs the plain single-process loop
  (`raydiff train --no-ray`) on the same config and thread count (target: at most 5% slower);
- scaling: Ray Train with 1 and with 2 single-thread CPU workers at the same global batch;
- heterogeneous: two workers, rank 1 slowed `--slow-factor`x by the benchmark knob
  (`debug.slow_factor`), with equal and with throughput-balanced local batches, each as a share
  of the ideal: the sum of what each worker does alone at half the global batch
  (target: balanced >= 90%).

tokens/s is the steady state: reports after the first `--warmup-steps` steps (the first window
holds start-up, compilation of the data pipeline and the first balance measurement).

    python scripts/bench_train.py [--steps 300] [--batch-size 64] [--config smoke] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from raydiff.config import apply_overrides, load_config
from raydiff.runtime import start_ray
from raydiff.train.local import train_local
from raydiff.train.trainer import read_reports, train_on_ray

ROOT = Path(__file__).resolve().parents[1]


def steady_tokens_per_s(reports: list[dict], warmup_steps: int) -> float:
    kept = [r["tokens_per_s"] for r in reports if r["step"] > warmup_steps]
    if not kept:
        raise SystemExit(f"no report after step {warmup_steps}: raise --steps")
    return sum(kept) / len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="smoke")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--slow-factor", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternating single-process and 1-worker runs (medians compared)")
    parser.add_argument("--articles", type=int, default=4000,
                        help="synthetic corpus size: epochs long enough that the per-epoch "
                             "restart of the Ray Data stream (about a second) is not what is "
                             "measured")
    parser.add_argument("--model", nargs="*", default=["model.hidden_size=128",
                                                       "model.intermediate_size=512"],
                        help="overrides that size the model (key=value)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="bench_train"))
    base = load_config(ROOT / "configs" / f"{args.config}.yaml", [
        *args.model, f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
        "train.log_every=25", f"train.eval_every={args.steps}",
        f"train.checkpoint_every={args.steps}", f"data.out_dir={work / 'data'}",
        f"data.synthetic_size={args.articles}",
        f"train.output_dir={work / 'runs'}", "train.num_threads=1", "train.precision=fp32"])
    start_ray(None)

    def ray_run(name: str, **overrides) -> float:
        cfg = apply_overrides(base, {"train.run_name": name, **overrides})
        run = train_on_ray(cfg)
        return steady_tokens_per_s(read_reports(run.run_dir), args.warmup_steps)

    def local_run(name: str) -> float:
        run = train_local(apply_overrides(base, {"train.run_name": name}))
        return steady_tokens_per_s(read_reports(run.run_dir), args.warmup_steps)

    # the overhead is a few percent against run-to-run noise of about as much on a shared
    # host: alternate the two and compare medians
    one = {"ray.num_workers": 1, "ray.cpus_per_worker": 1.0}
    local_runs, ray_one_runs = [], []
    for i in range(args.repeat):
        local_runs.append(local_run(f"local{i}"))
        ray_one_runs.append(ray_run(f"ray1_{i}", **one))
    local_tps, ray_one = statistics.median(local_runs), statistics.median(ray_one_runs)

    two = {"ray.num_workers": 2, "ray.cpus_per_worker": 0.5}
    ray_two = ray_run("ray2", **two)

    half = {**one, "train.batch_size": args.batch_size // 2}
    fast_alone = ray_run("fast_alone", **half)
    slow_alone = ray_run("slow_alone", **half, **{"debug.slow_rank": 0,
                                                  "debug.slow_factor": args.slow_factor})
    slowed = {**two, "debug.slow_rank": 1, "debug.slow_factor": args.slow_factor}
    equal = ray_run("hetero_equal", **slowed)
    balanced = ray_run("hetero_balanced", **slowed, **{"ray.batch_balance": "throughput",
                                                       "ray.rebalance_every": 100})
    ideal = fast_alone + slow_alone
    balance_log = [json.loads(line) for line in
                   (work / "runs" / "hetero_balanced" / "balance.jsonl").read_text().splitlines()]
    print(json.dumps({
        "config": args.config, "model": args.model, "global_batch": args.batch_size,
        "steps": args.steps, "cpus": os.cpu_count(),
        "ray_overhead": {"local_tokens_per_s": local_tps, "ray_1_worker_tokens_per_s": ray_one,
                         "local_runs": local_runs, "ray_1_worker_runs": ray_one_runs,
                         "slowdown": 1 - ray_one / local_tps,
                         "target_met": ray_one >= 0.95 * local_tps},
        "scaling": {"workers_1": ray_one, "workers_2": ray_two, "speedup": ray_two / ray_one},
        "heterogeneous": {
            "slow_factor": args.slow_factor, "fast_alone": fast_alone, "slow_alone": slow_alone,
            "ideal": ideal, "equal": equal, "balanced": balanced,
            "equal_share_of_ideal": equal / ideal, "balanced_share_of_ideal": balanced / ideal,
            "local_batches": [m["local_batch"] for m in balance_log],
            "target_met": balanced >= 0.9 * ideal},
    }, indent=2))


if __name__ == "__main__":
    main()
