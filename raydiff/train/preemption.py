"""Preemption notices. A SIGTERM to a training worker (a cloud's spot notice, `ray stop`, a
KubeRay pod deletion) makes the whole group checkpoint at the next step boundary and stop, so a
graceful preemption repeats no step; Ray Train then restarts the group from that checkpoint
(`ray.max_failures` counts the restart), on the workers the cluster still has.

Ray Train runs the training function in a thread of each worker actor, and Python sets signal
handlers only from a process's main thread, where the actor's own tasks run. The backend of
`preemptible_torch_config()` therefore installs the handler through the worker group (one task
per worker) when training starts. The handler only sets a flag; the ranks agree on it in the
collective they already run before every step (`raydiff.train.balance.agree`), so every rank
stops before the same step.
"""

from __future__ import annotations

import signal
import threading

_notice = threading.Event()


class PreemptedError(RuntimeError):
    """The group stopped on a preemption notice, after checkpointing its last step."""


def listen_for_sigterm() -> None:
    """From now on SIGTERM sets this process's notice instead of ending it (main thread)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: _notice.set())


def notice_received() -> bool:
    """Whether this process got SIGTERM since `listen_for_sigterm`."""
    return _notice.is_set()


def preemptible_torch_config():
    """A `TorchConfig`: torch's process-group setup, plus the SIGTERM notice on every worker
    (installed by its backend when training starts)."""
    from ray.train.torch import TorchConfig

    class PreemptibleBackend(TorchConfig().backend_cls):
        def on_training_start(self, worker_group, backend_config) -> None:
            super().on_training_start(worker_group, backend_config)
            worker_group.execute(listen_for_sigterm)

    class PreemptibleTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return PreemptibleBackend

    return PreemptibleTorchConfig()
