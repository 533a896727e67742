"""Elastic, preemption-tolerant training: the `[min, max]` worker range, a checkpoint of N
workers resumed on M (the same parameters as an uninterrupted run), and on a real multi-node
cluster a graceful preemption (SIGTERM), a lost node and a node added back, with the driver's
record of each change of worker group."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from raydiff.config import ConfigError, apply_overrides, load_config
from raydiff.train.checkpoint import load_checkpoint
from raydiff.train.monitor import group_change
from tests.conftest import ROOT
from tests.helpers.tensorboard import tensorboard_scalars


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------- the worker range

def test_num_workers_takes_an_int_or_a_min_max_range():
    fixed = load_config(None, ["ray.num_workers=3"]).ray
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers, fixed.scaling_workers) == \
        (False, 3, 3, 3)
    ranged = load_config(None, ["ray.num_workers=[1, 4]", "ray.elastic_resize_interval_s=5"]).ray
    assert (ranged.elastic, ranged.min_workers, ranged.max_workers) == (True, 1, 4)
    assert ranged.scaling_workers == (1, 4) and ranged.elastic_resize_interval_s == 5.0


@pytest.mark.parametrize(("override", "message"), [
    ("ray.num_workers=[4, 2]", r"ray.num_workers=\[4, 2\] must be an int or \[min, max\]"),
    ("ray.num_workers=[0, 2]", r"1 <= min <= max"),
    ("ray.num_workers=[1, 2, 3]", r"must be an int or \[min, max\]"),
    ("ray.num_workers=two", r"ray.num_workers must be int or list, got 'two'"),
    ("ray.elastic_resize_interval_s=0", r"ray.elastic_resize_interval_s=0.0 must be > 0"),
])
def test_a_bad_worker_range_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_per_worker_lists_and_small_batches_are_checked_against_the_range(smoke_cfg):
    with pytest.raises(ConfigError, match="ray.batch_shares fixes one number per worker"):
        apply_overrides(smoke_cfg, {"ray.num_workers": [1, 2], "ray.batch_shares": [1, 1]})
    with pytest.raises(ConfigError, match=r"train.batch_size=2 is smaller than ray.num_workers"):
        apply_overrides(smoke_cfg, {"ray.num_workers": [1, 4], "train.batch_size": 2})


def test_tune_refuses_an_elastic_range_before_starting_ray(tmp_path):
    from raydiff.tune.ablation import run_ablation

    cfg = load_config(ROOT / "configs" / "tune" / "smoke.yaml", [
        "ray.num_workers=[1, 2]", f"tune.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="tune trials run fixed-size worker groups"):
        run_ablation(cfg)


def test_a_change_of_worker_group_becomes_one_resize_row():
    old = {"step": 12, "world_size": 2, "group_started_at": 100.0, "resumed_from": 0}
    assert group_change(old, old | {"step": 13}) is None  # the same group
    new = {"step": 11, "world_size": 1, "group_started_at": 130.0, "resumed_from": 10,
           "steps_repeated": 2, "idle_s": 17.5, "after_preemption": 0.0}
    assert group_change(old, new) == {
        "step": 10, "old_world_size": 2, "new_world_size": 1, "steps_repeated": 2,
        "seconds_without_training": 17.5, "preempted": False}


def test_min_workers_that_do_not_fit_fail_in_one_line(ray_session, smoke_cfg):
    from raydiff.train.trainer import check_resources

    check_resources(apply_overrides(smoke_cfg, {"ray.num_workers": [1, 8],
                                                "ray.cpus_per_worker": 1.0}))  # 1 fits
    with pytest.raises(ValueError, match=r"ray.num_workers=\[3, 8\]: min workers do not fit "
                                         r"the cluster: 3 x ray.cpus_per_worker=1.0 needs 3 CPUs"):
        check_resources(apply_overrides(smoke_cfg, {"ray.num_workers": [3, 8],
                                                    "ray.cpus_per_worker": 1.0}))


# ---------------------------------------------------------------------- N workers -> M workers

@pytest.mark.timeout(600)
def test_a_run_resized_up_and_down_ends_with_the_uninterrupted_parameters(
        ray_session, smoke_cfg, tmp_path):
    """With a data order fixed by (seed, step) (`debug.fixed_data_order`: the batches of
    `--no-ray` training), 2 steps on 1 worker, 2 on 2 workers, then 2 on 1 end with the weights
    and EMA of 6 uninterrupted steps in one process, within the DDP equivalence tolerance
    (tests/test_ddp_equivalence.py: W workers take one process's step): the global batch, its
    draws, the LR schedule, the EMA and the step count carry over a change of size, up and
    down."""
    from raydiff.train.local import train_local
    from raydiff.train.trainer import train_on_ray

    base = apply_overrides(smoke_cfg, {
        "data.synthetic_size": 100, "data.out_dir": str(tmp_path / "data"),
        "ray.cpus_per_worker": 0.5, "debug.fixed_data_order": True, "train.log_every": 1,
        "train.checkpoint_every": 2, "train.eval_every": 6, "optim.lr": 3e-3,
        "train.precision": "fp32"})  # bf16 where the CPU has it: a batch-size-dependent rounding

    whole = train_local(apply_overrides(base, {"train.run_name": "uninterrupted",
                                               "train.max_steps": 6}))
    reference, _, _, _ = load_checkpoint(whole.run_dir)
    legs = ((1, 2), (2, 4), (1, 6))  # (workers, steps at the end of the leg)
    for workers, steps in legs:
        done = train_on_ray(apply_overrides(base, {
            "train.run_name": "resized", "ray.num_workers": workers, "train.max_steps": steps}))
    state, _, _, _ = load_checkpoint(done.run_dir)
    sizes = [(r["step"], r["world_size"]) for r in _rows(done.run_dir / "metrics.jsonl")]
    assert sizes == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 1), (6, 1)]
    assert state["step"] == 6
    for part, values in (("model", reference["model"]), ("ema", reference["ema"]["model"])):
        mine = state["model"] if part == "model" else state["ema"]["model"]
        for key, value in values.items():
            torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-5,
                                       msg=f"{part}.{key}")
    assert state["lr_schedule"]["last_epoch"] == reference["lr_schedule"]["last_epoch"]
    moved = sum(not torch.allclose(v, reference["ema"]["model"][k])
                for k, v in reference["model"].items())
    assert moved > 10  # the weights trained away from their EMA: the equality is not trivial


# ---------------------------------------------------------------------- a real multi-node cluster

@pytest.mark.ray  # a cluster of its own, in another process
@pytest.mark.timeout(900)
def test_preemption_node_loss_and_regrowth_on_a_multi_node_cluster(tmp_path):
    """scripts/bench_elastic.py --quick: 2 workers, one per node; SIGTERM to one (the group
    checkpoints at the next step and repeats none), node B removed without grace (training
    goes on at world size 1 from the latest checkpoint), a node added (back to 2); the run
    reaches max_steps, every change is in resizes.jsonl and the log's steps run on."""
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="rde", dir="/tmp"),
               PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "scripts/bench_elastic.py", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=880)
    assert done.returncode == 0, done.stderr[-3000:]
    # the JSON object, then whatever Ray's own processes print at shut-down
    result, _ = json.JSONDecoder().raw_decode(done.stdout, done.stdout.index("{"))
    assert result["final_step"] == result["max_steps"] == 40
    assert result["first_group_nodes"] == 2  # one slot a node: a worker on each
    run_dir = Path(result["run_dir"])

    changes = _rows(run_dir / "resizes.jsonl")
    assert [(c["old_world_size"], c["new_world_size"], c["preempted"]) for c in changes] == [
        (2, 2, True), (2, 1, False), (1, 2, False)]
    graceful, hard, grown = changes
    assert graceful["steps_repeated"] == 0  # checkpointed at the step after the SIGTERM
    assert hard["steps_repeated"] <= 5 and grown["steps_repeated"] <= 5  # checkpoint_every
    assert all(c["seconds_without_training"] > 0 for c in changes)

    rows = _rows(run_dir / "metrics.jsonl")
    notice = [r for r in rows if r.get("preempted")]
    assert len(notice) == 1 and notice[0]["step"] == graceful["step"]
    trained = [r for r in rows if "loss" in r]
    groups: dict[float, list[dict]] = {}
    for r in trained:
        groups.setdefault(r["group_started_at"], []).append(r)
    assert [g[0]["world_size"] for g in groups.values()] == [2, 2, 1, 2]
    for members in groups.values():  # each group starts right after its checkpoint, no gaps
        steps = [r["step"] for r in members]
        assert steps == list(range(members[0]["resumed_from"] + 1, steps[-1] + 1))
    starts = [g[0]["resumed_from"] for g in groups.values()]
    assert starts[1:] == [c["step"] for c in changes]
    assert starts[1] == [g[-1]["step"] for g in groups.values()][0]  # graceful: nothing repeated
    logged = tensorboard_scalars(run_dir / "tensorboard")
    assert set(logged["world_size"].values()) == {1.0, 2.0}
    assert "group_started_at" not in logged
