"""scripts/gpu_check.sh, the prepared GPU check, in its CPU dry run: every step runs at tiny
sizes and writes its JSON (the script's exit status counts the failed steps)."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ANCHOR = ROOT.parent / "shared" / "anchors" / "minimal-text-diffusion"


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_writes_every_steps_json(tmp_path):
    env = os.environ | {"OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
                        "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], env=env,
                          capture_output=True, text=True, timeout=880, cwd=tmp_path)
    out = tmp_path / "out"
    logs = {p.name: p.read_text()[-1500:] for p in out.glob("*.log")}
    assert done.returncode == 0, (done.stderr[-2000:], logs)

    step = json.loads((out / "bench_step.json").read_text())
    eager, layers, chunked, lean, compiled = step["results"]
    assert [(r["compile"], r["diagnostics"], r["encoder"], r["head"])
            for r in step["results"]] == [
        ("off", True, "bert", "logits"), ("off", True, "raydiff", "logits"),
        ("off", True, "raydiff", "chunked"), ("off", False, "raydiff", "chunked"),
        ("default", False, "raydiff", "chunked")]
    assert all(r["tokens_per_s"] > 0 and len(r["round_step_s"]) == 1 for r in step["results"])
    assert eager["flops_per_step"] == layers["flops_per_step"]  # the same model, other code
    assert chunked["flops_per_step"] > layers["flops_per_step"]  # the backward recomputes logits
    assert compiled["speedup_vs_eager"] == pytest.approx(eager["step_s"] / compiled["step_s"])
    assert eager["paired_speedup"] == 1 and lean["paired_speedup"] == pytest.approx(
        eager["round_step_s"][0] / lean["round_step_s"][0])
    assert eager["flops_per_step"] > 0 and 0 < eager["mfu"] < 1

    train = json.loads((out / "ray_train.json").read_text())
    assert train["last"]["step"] == 4 and train["reports"] == 2

    sample = json.loads((out / "bench_sample.json").read_text())
    assert [(r["sampler"], r["steps"], r["precision"]) for r in sample["runs"]] == [
        ("ddpm", 2000, "float32"), ("ddim", 20, "float32")]
    assert all(math.isfinite(r["gen_ppl"]) and r["samples_per_s"] > 0 for r in sample["runs"])

    if ANCHOR.is_dir():  # the side-by-side with minimal-text-diffusion's own step
        (row,) = json.loads((out / "bench_step_anchor.json").read_text())["side_by_side"]
        assert row["mtd_median"] > 0 and row["ratio"] == pytest.approx(
            row["raydiff_median"] / row["mtd_median"])
    assert (out / "gpu.txt").exists()
