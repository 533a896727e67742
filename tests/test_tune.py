"""`raydiff tune` on the test session's Ray: ASHA stops trials early, every trial is in the
results, and an interrupted sweep resumes without re-running finished trials."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from raydiff.config import apply_overrides, load_config
from raydiff.tune.ablation import run_ablation
from raydiff.tune.results import finish
from tests.conftest import ROOT

pytestmark = [pytest.mark.timeout(600), pytest.mark.ray]


def _smoke(tmp_path, **overrides):
    cfg = load_config(ROOT / "configs" / "tune" / "smoke.yaml")
    return apply_overrides(cfg, {"tune.output_dir": str(tmp_path / "tune"),
                                 "data.out_dir": str(tmp_path / "data"), **overrides})


def test_asha_sweep_stops_trials_early_and_reports_every_trial(ray_session, tmp_path):
    cfg = _smoke(tmp_path)
    experiment = run_ablation(cfg, verbose=0)
    assert not experiment.interrupted
    summary = finish(experiment)
    with open(experiment.path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {(r["diffusion.schedule"], r["diffusion.loss"]) for r in rows} == {
        (s, loss) for s in ("linear", "pw_lin") for loss in ("rounding", "anchor")}
    iterations = [int(r["iterations"]) for r in rows]
    full = cfg.train.max_steps // cfg.train.log_every
    assert max(iterations) == full  # the best trial ran to the end ...
    assert min(iterations) < full  # ... and ASHA stopped at least one before it
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped and all(int(r["steps"]) < cfg.train.max_steps for r in stopped)
    assert all(r["status"] == "done" and float(r["best_val_mse"]) > 0 for r in rows)
    # the figure, the best checkpoint and the per-noise-level yardsticks exist
    assert summary["plot"].stat().st_size > 10_000
    for name in ("scale", "rank"):  # the collapse diagnostics' figures
        assert (experiment.path / f"collapse-{name}.png").stat().st_size > 10_000
    # a tiny run moves its embeddings, but nowhere near the collapse rule
    assert all(r["collapsed"] == "False" and r["collapsed_at_step"] == "" for r in rows)
    assert all(0.5 < float(r["emb_scale_ratio"]) < 2 for r in rows)
    assert (summary["best_checkpoint"] / "state.pt").exists()
    assert summary["yardsticks"] and all(
        sum(b["count"] for b in buckets) > 0 for buckets in summary["yardsticks"].values())


def _finished_trials(experiment_dir):
    """Trials that Tune's saved experiment state records as terminated, by run directory."""
    states = sorted(experiment_dir.glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    except (ValueError, KeyError):  # caught mid-write
        return []
    done = {f"{int(t['trial_id'].rsplit('_', 1)[-1]):03d}_" for t in trials
            if t["status"] == "TERMINATED"}
    return sorted(d.name for d in (experiment_dir / "runs").glob("*") if d.name[:4] in done)


def test_interrupted_sweep_resumes_and_skips_finished_trials(ray_session, tmp_path):
    """Driven by trial completion, not a clock: the sweep searches over `debug.hold_file`, so
    one of its two trials cannot finish while the file exists. Ctrl-C comes once Tune's saved
    state records the free trial as ended."""
    hold = tmp_path / "hold"
    hold.touch()
    cfg = _smoke(tmp_path, **{"tune.scheduler": "fifo", "train.max_steps": 40,
                              "train.run_name": "restore", "tune.max_concurrent_trials": 2})
    cfg.tune.search_space = {"debug.hold_file": {"grid": ["", str(hold)]}}
    config_file = tmp_path / "sweep.yaml"
    cfg.save(config_file)
    experiment_dir = tmp_path / "tune" / "restore"
    address = ray_session.get_runtime_context().gcs_address
    with open(tmp_path / "sweep.log", "w") as log:
        sweep = subprocess.Popen(
            [sys.executable, "-m", "raydiff.cli", "tune", "--config", str(config_file),
             "--address", address], cwd=tmp_path, start_new_session=True, stdout=log,
            stderr=subprocess.STDOUT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 400  # a guard against a hang, not the condition
        while not _finished_trials(experiment_dir):
            assert sweep.poll() is None, "the sweep ended with a held trial still to run"
            assert time.monotonic() < deadline, "the free trial did not finish in 400 s"
            time.sleep(1)
        sweep.send_signal(signal.SIGINT)  # Ctrl-C
        assert sweep.wait(timeout=120) == 130  # "interrupted; continue with --resume"
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    finished = _finished_trials(experiment_dir)
    assert len(finished) == 1 and finished[0].endswith("hold_file="), finished  # the free one
    before = {name: (experiment_dir / "runs" / name / "metrics.jsonl").read_text()
              for name in finished}

    hold.unlink()  # the held trial may now run to the end
    resumed = run_ablation(resume=experiment_dir, verbose=0)
    assert not resumed.interrupted
    rows = finish(resumed, with_yardsticks=False)["rows"]
    assert len(rows) == 2 and all(r["status"] == "done" and r["steps"] == 40 for r in rows)
    for name in finished:  # not run again: one start, the same reports
        assert (experiment_dir / "runs" / name / "starts.log").read_text().count("\n") == 1
        assert (experiment_dir / "runs" / name / "metrics.jsonl").read_text() == before[name]
