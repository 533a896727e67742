"""Starting or joining Ray: the one place every command (prepare, train, tune, eval, cluster
check) and the test suite does it.

`start_ray(address)` joins `address` (a command's `--address`, else its `ray.address`), else
`RAY_ADDRESS`, else starts a local Ray sized to this machine (or to `num_cpus`). An address to
join must answer within `connect_timeout_s` (`ray.connect_timeout_s`, 20 s by default), or
start-up fails with one line naming it: left alone, `ray.init` retries an address where nothing
listens for minutes. A local Ray keeps idle worker processes alive
(`num_workers_soft_limit`): by default Ray allows as many idle workers as there are *free*
CPUs, which is none while a Ray Data pipeline keeps every CPU busy, so each shuffle's own
worker pool was killed and restarted at every stage (about a second a process on a 2-core
machine: `prepare` on Reuters took 12 s instead of 2 s). On a cluster started with `ray start`,
set the same with `RAY_num_workers_soft_limit` (cluster/*.yaml do).
"""

from __future__ import annotations

import os
import socket

from raydiff.errors import RaydiffError

TRIAL_DRIVER_RESOURCE = "raydiff_trial_driver"  # what a Tune trial's driver holds, not a CPU


def idle_workers_kept(num_cpus: int) -> int:
    """Idle worker processes a node keeps: enough for the plain, shuffle-map and shuffle-reduce
    pools of a Ray Data pipeline to survive between stages."""
    return max(8, 3 * num_cpus)


def start_ray(address: str | None = None, *, connect_timeout_s: float = 20.0,
              num_cpus: int | None = None, object_store_memory: int | None = None,
              include_dashboard: bool = True) -> None:
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
    else:
        check_answers(address, connect_timeout_s)
    ray.init(address=address, include_dashboard=include_dashboard, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}, **local)


def check_answers(address: str, timeout_s: float) -> None:
    """Raise `RaydiffError` unless something accepts a connection at the Ray `address`
    (host:port of a GCS, ray://host:port of a Ray Client server, or "auto": the cluster
    `ray start` last started on this machine) within `timeout_s`."""
    if address.startswith(("http://", "https://")):
        raise RaydiffError(f"Ray address {address}: a dashboard (Jobs API) address, for `ray job "
                           f"submit`; joining needs the GCS host:port (6379) or ray://host:10001")
    target = address.removeprefix("ray://")
    if target == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            target = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            target = None
        if target is None:
            raise RaydiffError("Ray address 'auto': no running Ray cluster found on this "
                               "machine (start one with `ray start --head`)")
    host, sep, port = (target or "").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RaydiffError(f"Ray address {address!r}: expected host:port, ray://host:port, "
                           f"auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise RaydiffError(f"Ray address {address}: cannot connect ({why} within "
                           f"{timeout_s:g} s; ray.connect_timeout_s sets the wait)") from None
    # something listens (or a proxy accepts every connection): is it a Ray GCS?
    if not address.startswith("ray://") and (why := _not_a_gcs(target, timeout_s)):
        raise RaydiffError(f"Ray address {address}: cannot connect (no Ray GCS answers there: "
                           f"{why})")


def _not_a_gcs(target: str, timeout_s: float) -> str | None:
    """Why no Ray GCS answers at host:port within about `timeout_s` (Ray's own client adds a
    few seconds of its own), or None when one does. Ray's client logs each failed attempt on
    the C++ side, straight to file descriptor 2: those lines are silenced, the reason kept."""
    try:
        from ray._raylet import InnerGcsClient  # Ray's own GCS client (not a public API)
    except ImportError:
        return None
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            InnerGcsClient.standalone(target, None, int(timeout_s * 1000))
    except Exception as e:  # ray.exceptions.RpcError and kin: all mean "not a GCS we can use"
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return None
