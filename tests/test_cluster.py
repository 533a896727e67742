"""Cluster files: each validates offline against Ray's own schema (or KubeRay's required
fields), and a config asking for what no node type has fails in one line."""

import copy

import pytest
import yaml

from raydiff import cli
from raydiff.cluster import ClusterError, check_request, load_cluster_file
from raydiff.config import load_config
from tests.conftest import ROOT

CLUSTER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))


def test_cluster_directory_ships_aws_onprem_and_kuberay():
    assert {p.name for p in CLUSTER_FILES} >= {"aws.yaml", "onprem.yaml", "kuberay.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_cluster_file_validates(path):
    cluster = load_cluster_file(path)
    if cluster.kind == "kuberay":
        raw = yaml.safe_load(path.read_text())
        groups = raw["spec"]["workerGroupSpecs"]
        gpu_types = [g["labels"]["raydiff/gpu"] for g in groups]
        assert len(gpu_types) == len(set(gpu_types)) >= 3  # one group per GPU type
        for g in groups:
            assert g["template"]["spec"]["nodeSelector"]
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_heterogeneous_aws_node_types_advertise_gpu_models():
    cluster = load_cluster_file(ROOT / "cluster" / "aws.yaml")
    models = {r.split(":", 1)[1] for t in cluster.node_types for r in t.resources
              if r.startswith("accelerator_type:")}
    assert models == {"A100", "A10G", "T4"}
    head = next(t for t in cluster.node_types if t.name == "head")
    assert head.resources["raydiff_trial_driver"] >= 1  # Tune trial drivers hold this


def _mutated(tmp_path, name, change):
    raw = yaml.safe_load((ROOT / "cluster" / name).read_text())
    change(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name, change, message", [
    ("aws.yaml", lambda r: r.update(max_wokers=3), r"'max_wokers' was unexpected"),
    ("aws.yaml", lambda r: r["available_node_types"]["gpu_t4"]["resources"].update(GPU=0.5),
     r"available_node_types.gpu_t4.resources.GPU: 0.5 is not of type 'integer'"),
    ("onprem.yaml", lambda r: r["provider"].pop("head_ip"), r"head_ip"),
    ("kuberay.yaml", lambda r: r["spec"]["workerGroupSpecs"][1]["labels"].update(
        {"raydiff/gpu": "A100"}), r"GPU type A100 already has group gpu-a100"),
    ("kuberay.yaml", lambda r: r["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
     r"spec.workerGroupSpecs\[0\].maxReplicas is required"),
])
def test_broken_cluster_files_fail_in_one_line(tmp_path, name, change, message):
    with pytest.raises(ClusterError, match=message) as info:
        load_cluster_file(_mutated(tmp_path, name, copy.deepcopy(change)))
    assert "\n" not in str(info.value)


def test_requests_no_node_type_provides_fail_in_one_line(capsys):
    aws = load_cluster_file(ROOT / "cluster" / "aws.yaml")
    reuters = ROOT / "configs" / "reuters.yaml"
    fit = check_request(load_config(reuters, ["ray.use_gpu=true", "ray.num_workers=6"]), aws)
    assert fit["per_node_type"]["gpu_t4"] == 8 and fit["per_node_type"]["head"] == 0
    with pytest.raises(ClusterError, match=r"ray.accelerator_type=H100: no node type in .*aws"
                                           r".yaml provides accelerator_type:H100"):
        check_request(load_config(reuters, ["ray.use_gpu=true", "ray.accelerator_type=H100"]),
                      aws)
    with pytest.raises(ClusterError, match=r"ray.num_workers=64: .* hold at most 40"):
        check_request(load_config(reuters, ["ray.use_gpu=true", "ray.num_workers=64"]), aws)
    # an elastic range needs only its min workers to fit
    check_request(load_config(reuters, ["ray.use_gpu=true", "ray.num_workers=[8, 64]"]), aws)
    with pytest.raises(ClusterError, match=r"ray.num_workers=\[41, 64\]: .* hold at most 40"):
        check_request(load_config(reuters, ["ray.use_gpu=true", "ray.num_workers=[41, 64]",
                                            "train.batch_size=64"]), aws)
    # the same through the CLI: exit 2, one line
    code = cli.main(["cluster", "check", str(ROOT / "cluster" / "kuberay.yaml"), "--config",
                     str(ROOT / "configs" / "smoke.yaml"), "ray.worker_resources.tpu=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "ray.worker_resources.tpu: no node type" in err
    assert len(err.splitlines()) == 1
