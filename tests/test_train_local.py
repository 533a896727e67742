import json

import pytest
import torch

from raydiff.config import apply_overrides
from raydiff.train import engine as engine_module
from raydiff.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from raydiff.train.engine import NonFiniteLossError
from raydiff.train.local import train_local


def _short(cfg, **overrides):
    base = {"train.max_steps": 20, "train.log_every": 5, "train.eval_every": 10,
            "train.checkpoint_every": 10, "data.synthetic_size": 120}
    return apply_overrides(cfg, base | overrides)


def test_run_writes_config_metrics_and_loadable_checkpoints(smoke_cfg):
    cfg = _short(smoke_cfg)
    run = train_local(cfg)
    assert (run.run_dir / "config.yaml").exists()
    reports = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == [5, 10, 15, 20]
    assert all("val_mse" in r and "val_token_accuracy" in r for r in reports if r["step"] % 10 == 0)
    for key in ("loss", "mse", "ce", "tT", "rounding_ce", "anchor_ce", "token_accuracy",
                "grad_norm", "lr", "tokens_per_s"):
        assert key in reports[0]
    assert reports[-1]["loss"] < reports[0]["loss"]
    ckpt = latest_checkpoint(run.run_dir)
    assert ckpt.name == "step_00000020" and run.last_checkpoint == ckpt
    state, loaded_cfg, tokenizer, _ = load_checkpoint(run.run_dir)
    assert state["step"] == 20 and loaded_cfg == cfg and len(tokenizer) > 10


def test_resumed_run_ends_equal_to_uninterrupted_run(smoke_cfg, tmp_path):
    whole = train_local(_short(smoke_cfg, **{"train.output_dir": str(tmp_path / "a")}))
    cut = _short(smoke_cfg, **{"train.output_dir": str(tmp_path / "b")})
    train_local(apply_overrides(cut, {"train.max_steps": 10}))
    resumed = train_local(cut)
    a, _, _, _ = load_checkpoint(whole.run_dir)
    b, _, _, _ = load_checkpoint(resumed.run_dir)
    assert b["step"] == 20
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in a["ema"]["model"].items():
        torch.testing.assert_close(b["ema"]["model"][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(smoke_cfg, monkeypatch):
    cfg = _short(smoke_cfg)
    real = engine_module.diffusion_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls["n"] += torch.is_grad_enabled()  # training calls only, not validation
        if torch.is_grad_enabled() and calls["n"] == 13:  # step 13, after the step-10 checkpoint
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(engine_module, "diffusion_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        train_local(cfg)
    ckpt = latest_checkpoint(cfg.train.output_dir + "/smoke")
    assert ckpt.name == "step_00000010"
    state, _, _, _ = load_checkpoint(ckpt)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_missing_or_corrupt_checkpoint_gives_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "run")
    bad = tmp_path / "run" / "checkpoints" / "step_00000001"
    bad.mkdir(parents=True)
    (bad / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="none of its 1 checkpoints is intact"):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no integrity.json"):
        load_checkpoint(bad)


def test_group_precision_puts_a_whole_ddp_group_on_one_scale():
    from raydiff.train.precision import group_precision

    assert group_precision(["bf16", "bf16"]) == "bf16"  # A100s only
    assert group_precision(["bf16", "fp16", "bf16"]) == "fp16"  # A100s with a T4
    assert group_precision(["fp16", "fp16"]) == "fp16"
    assert group_precision(["bf16", "fp32"]) == "fp32"  # a CPU worker in the group


def test_validation_reports_mse_at_abar_one_half_for_every_schedule(smoke_cfg, monkeypatch):
    """The `_abar50` metrics are computed at the timestep whose abar, in the schedule's own
    table, is nearest 1/2: recorded from the losses the engine actually evaluates."""
    import numpy as np
    import torch

    from raydiff.config import apply_overrides
    from raydiff.diffusion import SCHEDULE_NAMES
    from raydiff.diffusion.schedules import get_named_beta_schedule
    from raydiff.train import engine as engine_module

    seen: list[torch.Tensor] = []

    def recording(model, schedule, batch, spec, draws):
        seen.append(draws.t.clone())
        return real(model, schedule, batch, spec, draws)

    real = engine_module.diffusion_losses
    monkeypatch.setattr(engine_module, "diffusion_losses", recording)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, 50, (8, 16), generator=g),
             "attention_mask": torch.ones(8, 16, dtype=torch.long)}
    for name in SCHEDULE_NAMES:
        abar = np.cumprod(1 - get_named_beta_schedule(name, 2000))  # the table itself
        t_half = int(np.abs(abar - 0.5).argmin())
        assert abs(abar[t_half] - 0.5) < 0.01, name  # every schedule passes 1/2
        cfg = apply_overrides(smoke_cfg, {"diffusion.schedule": name,
                                          "diffusion.num_steps": 2000})
        engine = engine_module.DiffusionEngine(cfg, 50, torch.device("cpu"))
        seen.clear()
        out = engine.evaluate([batch])
        uniform, at_half = seen  # one batch: the uniform draw, then the abar = 1/2 one
        assert at_half.tolist() == [t_half] * 8, name
        assert len(set(uniform.tolist())) > 1
        assert out["val_mse_abar50"] > 0 and 0 <= out["val_token_accuracy_abar50"] <= 1
        assert out["val_mse_abar50"] != out["val_mse"]
