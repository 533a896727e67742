"""Training on Ray Train V2 with DDP over gloo: a run, its checkpoints, and resuming it."""

import json

import pytest

from raydiff.config import apply_overrides
from raydiff.train.checkpoint import latest_checkpoint, load_checkpoint
from raydiff.train.trainer import check_resources, train_on_ray

pytestmark = pytest.mark.timeout(600)


def _reports(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_worker_ddp_run_checkpoints_and_resumes(ray_session, smoke_cfg, tmp_path):
    cfg = apply_overrides(smoke_cfg, {
        "train.max_steps": 10, "train.log_every": 5, "train.eval_every": 10,
        "train.checkpoint_every": 10, "data.synthetic_size": 200,
        "data.out_dir": str(tmp_path / "data"), "ray.num_workers": 2,
        "ray.cpus_per_worker": 0.5})
    first = train_on_ray(cfg)
    assert [r["step"] for r in _reports(first.run_dir)] == [5, 10]
    assert first.last_checkpoint.name == "step_00000010"
    state, saved_cfg, tokenizer = load_checkpoint(first.run_dir)
    assert state["step"] == 10 and saved_cfg.ray.num_workers == 2 and len(tokenizer) > 10
    assert "val_mse" in _reports(first.run_dir)[-1]

    resumed = train_on_ray(apply_overrides(cfg, {"train.max_steps": 20}))
    steps = [r["step"] for r in _reports(resumed.run_dir)]
    assert steps == [5, 10, 15, 20]  # continued from step 10, not from 0
    assert latest_checkpoint(resumed.run_dir).name == "step_00000020"
    final, _, _ = load_checkpoint(resumed.run_dir)
    assert final["step"] == 20


def test_more_workers_than_cpus_fails_fast(ray_session, smoke_cfg):
    with pytest.raises(ValueError, match=r"ray.num_workers=8 .* needs 8 CPUs; the cluster has 2"):
        check_resources(apply_overrides(smoke_cfg, {"ray.num_workers": 8,
                                                    "ray.cpus_per_worker": 1.0}))
    with pytest.raises(ValueError, match="ray.use_gpu=true"):
        check_resources(apply_overrides(smoke_cfg, {"ray.use_gpu": True}))
