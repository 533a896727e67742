import json

import pytest
import torch

from raydiff.config import apply_overrides
from raydiff.diffusion import losses as losses_module
from raydiff.model import head_ce
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


def test_a_time_limit_stops_at_the_first_report_past_it_with_a_checkpoint(smoke_cfg):
    run = train_local(_short(smoke_cfg, **{"train.time_limit_s": 1e-6}))
    reports = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == [5] and reports[0]["elapsed_s"] > 1e-6
    assert run.result.step == 5 and run.result.stopped_early
    assert latest_checkpoint(run.run_dir).name == "step_00000005"


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(smoke_cfg, monkeypatch):
    cfg = _short(smoke_cfg)
    real = losses_module.diffusion_losses  # what the training objective calls
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls["n"] += torch.is_grad_enabled()  # training calls only, not validation
        if torch.is_grad_enabled() and calls["n"] == 13:  # step 13, after the step-10 checkpoint
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(losses_module, "diffusion_losses", poisoned)
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


def test_collapse_is_flagged_at_the_first_evaluation_after_the_table_shrinks(smoke_cfg,
                                                                            monkeypatch, tmp_path):
    """The embedding table shrunk by hand to 5% at step 15 is marked collapsed at the step-20
    evaluation, not at step 10; a healthy run of the same config never is. The trial row
    (results.csv's columns) says so, with the step."""
    from types import SimpleNamespace

    from raydiff.tune.results import trial_rows

    cfg = _short(smoke_cfg, **{"train.max_steps": 40, "train.run_name": "shrunk"})
    real_step = engine_module.DiffusionEngine.train_step

    def step_then_shrink(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if self.step == 15:
            with torch.no_grad():
                self.model.word_embedding.weight.mul_(0.05)
        return out

    monkeypatch.setattr(engine_module.DiffusionEngine, "train_step", step_then_shrink)
    shrunk = train_local(cfg)
    monkeypatch.undo()
    healthy = train_local(apply_overrides(cfg, {"train.run_name": "healthy"}))

    def evals(run):
        return [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text()
                .splitlines() if "emb_collapsed" in line]
    marks = {r["step"]: (r["emb_collapsed"], r["emb_scale_ratio"]) for r in evals(shrunk)}
    assert sorted(marks) == [10, 20, 30, 40]
    assert marks[10][0] == 0.0 and marks[20][0] == marks[30][0] == marks[40][0] == 1.0
    assert marks[20][1] < 0.1 < marks[10][1]
    assert all(r["emb_collapsed"] == 0.0 and r["emb_scale_ratio"] > 0.5 for r in evals(healthy))
    assert all(r["emb_effective_rank"] > 1 for r in evals(healthy))

    # a trial that Tune stops ends with the row of its SIGTERM, a training row: the row keeps
    # the diagnostics of the last evaluation and the step of the last row
    last_eval = evals(healthy)[-1]
    with open(healthy.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 43, "loss": 1.0, "preempted": 1.0}) + "\n")
    runs = tmp_path / "experiment" / "runs"
    runs.mkdir(parents=True)
    results = []
    for run in (shrunk, healthy):
        (runs / run.run_dir.name).symlink_to(run.run_dir)
        results.append(SimpleNamespace(path=str(runs / run.run_dir.name), config={},
                                       error=None, metrics={}))
    rows = trial_rows(SimpleNamespace(cfg=cfg, path=tmp_path / "experiment", results=results))
    by_name = {r["trial"]: r for r in rows}
    assert by_name["shrunk"]["collapsed"] and by_name["shrunk"]["collapsed_at_step"] == 20
    assert not by_name["healthy"]["collapsed"] and by_name["healthy"]["collapsed_at_step"] is None
    assert by_name["healthy"]["steps"] == 43
    for key in ("emb_scale_ratio", "emb_norm_ratio", "emb_effective_rank"):
        assert by_name["healthy"][key] == last_eval[key]


def test_step_metrics_stay_on_the_device_until_the_report(smoke_cfg):
    from raydiff.train.loop import host_values

    engine = engine_module.DiffusionEngine(smoke_cfg, 50, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, 50, (8, 16), generator=g),
             "attention_mask": torch.ones(8, 16, dtype=torch.long)}
    out = engine.train_step(batch)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
               for k, v in out.items() if k != "lr")
    host = host_values(out | {"local_batch": 8})
    assert all(type(v) is float for v in host.values())
    assert host["tokens"] == 128.0 and host["loss"] == out["loss"].item()
    assert host["local_batch"] == 8.0 and host["lr"] == out["lr"]


@pytest.mark.ray  # compiles for a minute on 2 cores
def test_compiled_step_gives_the_plain_steps_losses_and_gradients(smoke_cfg, monkeypatch):
    """The whole objective compiled (forward process, denoiser, loss terms), on two threads,
    with the tied head's CE in four chunks (the rows of several chunks once came out of a
    compiled graph wrong on two threads: docs/benchmarks.md)."""
    monkeypatch.setattr(head_ce, "CPU_CHUNK_ELEMENTS", 50 * 40)  # 128 rows: 40, 40, 40, 8
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _compare_compiled_and_plain(smoke_cfg)
    finally:
        torch.set_num_threads(threads)


def _compare_compiled_and_plain(smoke_cfg) -> None:
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, 50, (8, 16), generator=g),
             "attention_mask": torch.ones(8, 16, dtype=torch.long)}
    plain = engine_module.DiffusionEngine(smoke_cfg, 50, torch.device("cpu"))
    fast = engine_module.DiffusionEngine(apply_overrides(smoke_cfg, {"train.compile": "default"}),
                                         50, torch.device("cpu"))
    assert fast.train_model is not fast.model  # the compiled wrapper, over the same weights
    for engine in (plain, fast):
        engine.probe_loss(batch).backward()
    for (name, a), b in zip(plain.model.named_parameters(), fast.model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
        a.grad = b.grad = None
    for _ in range(3):
        x, y = plain.train_step(batch), fast.train_step(batch)
        for key in ("loss", "mse", "anchor_ce", "rounding_ce", "grad_norm"):
            torch.testing.assert_close(y[key], x[key], rtol=1e-4, atol=1e-6, msg=key)
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(fast.model.state_dict()[name], value, rtol=1e-4, atol=1e-5,
                                   msg=name)


def test_diagnostics_are_measured_on_the_steps_that_report(smoke_cfg, monkeypatch):
    """The CE term that is not optimised and token accuracy cost a vocabulary-sized pass: the
    loop asks for them on report steps only, and reports their value there, not a mean that
    divides by steps that did not measure them."""
    cfg = _short(smoke_cfg, **{"train.max_steps": 12, "train.log_every": 4,
                               "train.eval_every": 6, "train.checkpoint_every": 12})
    asked, real = {}, engine_module.DiffusionEngine.train_step

    def recording(self, *args, diagnostics=True, **kwargs):
        out = real(self, *args, diagnostics=diagnostics, **kwargs)
        asked[self.step] = diagnostics, out.get("rounding_ce")
        return out

    monkeypatch.setattr(engine_module.DiffusionEngine, "train_step", recording)
    run = train_local(cfg)
    assert [s for s, (d, _) in sorted(asked.items()) if d] == [4, 6, 8, 12]
    reports = {r["step"]: r for r in (json.loads(line) for line in
                                      (run.run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(reports) == [4, 6, 8, 12]
    for step, report in reports.items():  # anchor loss: rounding_ce is the diagnostic
        assert report["rounding_ce"] == pytest.approx(asked[step][1].item())
