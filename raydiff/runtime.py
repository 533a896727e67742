"""Starting or joining Ray: the one place every command (prepare, train, tune, eval) and the
test suite does it.

`start_ray(address)` joins `address`, else `RAY_ADDRESS`, else starts a local Ray sized to this
machine (or to `num_cpus`). A local Ray keeps idle worker processes alive
(`num_workers_soft_limit`): by default Ray allows as many idle workers as there are *free*
CPUs, which is none while a Ray Data pipeline keeps every CPU busy, so each shuffle's own
worker pool was killed and restarted at every stage (about a second a process on a 2-core
machine: `prepare` on Reuters took 12 s instead of 2 s). On a cluster started with `ray start`,
set the same with `RAY_num_workers_soft_limit` (cluster/*.yaml do).
"""

from __future__ import annotations

import os

TRIAL_DRIVER_RESOURCE = "raydiff_trial_driver"  # what a Tune trial's driver holds, not a CPU


def idle_workers_kept(num_cpus: int) -> int:
    """Idle worker processes a node keeps: enough for the plain, shuffle-map and shuffle-reduce
    pools of a Ray Data pipeline to survive between stages."""
    return max(8, 3 * num_cpus)


def start_ray(address: str | None = None, *, num_cpus: int | None = None,
              object_store_memory: int | None = None, include_dashboard: bool = True) -> None:
    """Join `address` (or RAY_ADDRESS); without either, start a local Ray. A no-op when this
    process is already connected. The dashboard serves the State API, which Ray Train's
    placement-group cleaner polls (without it, the CPUs of a Tune trial that was stopped are
    never released)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = {}
    if address == "local":
        cpus = num_cpus or os.cpu_count() or 1
        # the resource Tune trial drivers hold instead of a CPU; cluster nodes advertise it
        # through their YAML (cluster/)
        local = {"num_cpus": num_cpus, "object_store_memory": object_store_memory,
                 "resources": {TRIAL_DRIVER_RESOURCE: 1000},
                 "_system_config": {"num_workers_soft_limit": idle_workers_kept(cpus)}}
    ray.init(address=address, include_dashboard=include_dashboard, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}, **local)
