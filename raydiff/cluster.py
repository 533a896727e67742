"""`raydiff cluster check`: a cluster file is valid, and a training config's requests fit it.

- Ray cluster launcher YAMLs (`ray up`) validate against the schema inside the installed `ray`
  package (`ray/autoscaler/ray-schema.json`, through the launcher's own `prepare_config` and
  `validate_config`: a private API, hence the pinned Ray).
- KubeRay `RayCluster` manifests are checked for the fields KubeRay requires and for one worker
  group per GPU type.
- The node types a file declares (launcher `available_node_types`, KubeRay groups) are then
  matched against what one training worker asks for: its CPUs, a GPU, `ray.accelerator_type`,
  `ray.worker_resources`, times `ray.num_workers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raydiff.config import Config
from raydiff.errors import RaydiffError


class ClusterError(RaydiffError):
    """An invalid cluster file, or a request it cannot satisfy; one line, naming file and key."""


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int  # how many such nodes the cluster may have
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterFile:
    path: Path
    kind: str  # "launcher" or "kuberay"
    node_types: list[NodeType] | None  # None: the file does not say (local provider)


def load_cluster_file(path: str | Path) -> ClusterFile:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ClusterError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ClusterError(f"{path}:{f' line {mark.line + 1}' if mark else ''} invalid YAML") from None
    if not isinstance(raw, dict):
        raise ClusterError(f"{path}: expected a mapping at the top level")
    if raw.get("kind") == "RayCluster":
        return ClusterFile(path, "kuberay", _kuberay_node_types(path, raw))
    return ClusterFile(path, "launcher", _launcher_node_types(path, raw))


# ----------------------------------------------------------------------------- launcher YAMLs


def _launcher_node_types(path: Path, raw: dict) -> list[NodeType] | None:
    import copy

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(raw)))
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "top level"
        raise ClusterError(f"{path}: {where}: {e.message}") from None
    except Exception as e:  # the launcher's own checks (ClickException, ValueError)
        message = str(getattr(e, "message", e)).strip().splitlines()[0]
        raise ClusterError(f"{path}: {message}") from None
    types = raw.get("available_node_types")
    if not types:
        return None
    return [NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                     max(int(spec.get("max_workers", 0)), 1 if name == raw.get("head_node_type")
                         else 0), dict(spec.get("labels") or {}))
            for name, spec in types.items()]


# ----------------------------------------------------------------------------- KubeRay


def _quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity: 4, "4", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _group_resources(path: Path, where: str, group: dict) -> dict[str, float]:
    try:
        containers = group["template"]["spec"]["containers"]
        limits = containers[0]["resources"]["limits"]
    except (KeyError, IndexError, TypeError):
        raise ClusterError(f"{path}: {where}.template.spec.containers[0].resources.limits is "
                           f"required") from None
    resources = {"CPU": _quantity(limits.get("cpu", 0))}
    if "nvidia.com/gpu" in limits:
        resources["GPU"] = _quantity(limits["nvidia.com/gpu"])
    extra = (group.get("rayStartParams") or {}).get("resources")
    if extra:
        resources |= {k: float(v) for k, v in yaml.safe_load(yaml.safe_load(extra)).items()}
    gpu_type = (group.get("labels") or {}).get("raydiff/gpu")
    if gpu_type and resources.get("GPU"):
        resources[f"accelerator_type:{gpu_type}"] = resources["GPU"]
    return resources


def _kuberay_node_types(path: Path, raw: dict) -> list[NodeType]:
    if raw.get("apiVersion") != "ray.io/v1":
        raise ClusterError(f"{path}: apiVersion must be ray.io/v1, got {raw.get('apiVersion')!r}")
    spec = raw.get("spec") or {}
    if not (raw.get("metadata") or {}).get("name"):
        raise ClusterError(f"{path}: metadata.name is required")
    if "headGroupSpec" not in spec:
        raise ClusterError(f"{path}: spec.headGroupSpec is required")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        raise ClusterError(f"{path}: spec.workerGroupSpecs needs at least one group")
    types = [NodeType("head", _group_resources(path, "spec.headGroupSpec", spec["headGroupSpec"]),
                      1)]
    gpu_types: dict[str, str] = {}
    for i, group in enumerate(groups):
        where = f"spec.workerGroupSpecs[{i}]"
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "template"):
            if key not in group:
                raise ClusterError(f"{path}: {where}.{key} is required")
        if not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            raise ClusterError(f"{path}: {where}: needs minReplicas <= replicas <= maxReplicas")
        resources = _group_resources(path, where, group)
        if resources.get("GPU"):
            selector = group["template"]["spec"].get("nodeSelector") or {}
            gpu_type = (group.get("labels") or {}).get("raydiff/gpu")
            if not selector or not gpu_type:
                raise ClusterError(f"{path}: {where} ({group['groupName']}) has GPUs but no "
                                   f"nodeSelector and raydiff/gpu label naming their type")
            if gpu_type in gpu_types:
                raise ClusterError(f"{path}: {where}: GPU type {gpu_type} already has group "
                                   f"{gpu_types[gpu_type]}; use one worker group per GPU type")
            gpu_types[gpu_type] = group["groupName"]
        types.append(NodeType(group["groupName"], resources, int(group["maxReplicas"]),
                              dict(group.get("labels") or {})))
    return types


# ----------------------------------------------------------------------------- the request


def worker_demand(cfg: Config) -> dict[str, float]:
    """What one raydiff training worker asks Ray for."""
    demand = {"CPU": cfg.ray.cpus_per_worker, **cfg.ray.worker_resources}
    if cfg.ray.use_gpu:
        demand["GPU"] = 1.0
    if cfg.ray.accelerator_type:
        demand[f"accelerator_type:{cfg.ray.accelerator_type}"] = 0.001  # as Ray Train asks
    return demand


def _config_key(resource: str) -> str:
    if resource == "GPU":
        return "ray.use_gpu=true"
    if resource == "CPU":
        return "ray.cpus_per_worker"
    if resource.startswith("accelerator_type:"):
        return f"ray.accelerator_type={resource.split(':', 1)[1]}"
    return f"ray.worker_resources.{resource}"


def check_request(cfg: Config, cluster: ClusterFile) -> dict:
    """How many workers fit on each node type; a one-line ClusterError when the request
    names a resource no node type has, or asks for more workers than the cluster can hold."""
    demand = worker_demand(cfg)
    if cluster.node_types is None:
        return {"workers_that_fit": None, "per_node_type": {}}
    for resource, amount in demand.items():
        if not any(t.resources.get(resource, 0) >= amount for t in cluster.node_types):
            offered = sorted({r for t in cluster.node_types for r in t.resources})
            raise ClusterError(f"{_config_key(resource)}: no node type in {cluster.path} "
                               f"provides {resource} (they provide {', '.join(offered)})")
    per_type = {t.name: min(math.floor(t.resources.get(r, 0) / a + 1e-9)
                            for r, a in demand.items()) * t.max_count
                for t in cluster.node_types}
    fit = sum(per_type.values())
    if fit < cfg.ray.min_workers:
        raise ClusterError(f"ray.num_workers={cfg.ray.num_workers}: the node types of "
                           f"{cluster.path} hold at most {fit} such workers")
    return {"workers_that_fit": fit, "per_node_type": per_type}
