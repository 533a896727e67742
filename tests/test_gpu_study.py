"""scripts/gpu_study.sh, the prepared GPU study, on the CPU at tiny sizes: a reference LM and
the rounding and anchor runs, each for a time budget, and both evaluated against it."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.ray  # processes of its own, tens of seconds
@pytest.mark.timeout(600)
def test_gpu_study_trains_both_losses_for_the_budget_and_evaluates_them(tmp_path):
    env = os.environ | {"OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
                        "PYTHONPATH": str(ROOT), "DATA": "synthetic"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_study.sh"), "--cpu"], env=env,
                          capture_output=True, text=True, timeout=580, cwd=tmp_path)
    out = tmp_path / "out"
    logs = {p.name: p.read_text()[-1500:] for p in out.glob("*.log")}
    assert done.returncode == 0, (done.stderr[-2000:], logs)

    reference = json.loads((out / "train_reference.json").read_text())["last"]
    assert reference["elapsed_s"] >= 3 and reference["step"] < 25000  # stopped by its budget
    for loss in ("rounding", "anchor"):
        trained = json.loads((out / f"train_{loss}.json").read_text())["last"]
        assert trained["elapsed_s"] >= 3 and trained["step"] < 25000
        evaluated = json.loads((out / f"eval_{loss}.json").read_text())
        assert evaluated["step"] == trained["step"]  # the checkpoint the budget ended with
        assert f"reuters-{loss}" in evaluated["checkpoint"]
        for key in ("gen_ppl", "ref_ppl_real", "sample_entropy", "real_entropy", "mse"):
            assert math.isfinite(evaluated[key]), key
        assert evaluated["num_samples"] == 8
    rounding = json.loads((out / "train_rounding.json").read_text())["last"]
    anchor = json.loads((out / "train_anchor.json").read_text())["last"]
    assert anchor["ce"] == pytest.approx(anchor["anchor_ce"])  # each run optimised its own CE
    assert rounding["ce"] == pytest.approx(rounding["rounding_ce"])


def test_a_failed_or_timed_out_step_is_recorded_and_counted(tmp_path):
    """scripts/steps.sh (both GPU scripts' `step`): a step's stdout is its JSON; one that fails
    or overruns its limit leaves a JSON naming its exit status (124: the time limit) and
    counts in $failed, and the script goes on."""
    script = (f'source "{ROOT}/scripts/steps.sh"; out="{tmp_path}"; failed=0; '
              'step ok 5 echo \'{"a": 1}\'; step bad 5 false; step slow 1 sleep 5; '
              'echo "$failed"')
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "2"
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}
    assert json.loads((tmp_path / "bad.json").read_text())["error"] == "exit 1"
    assert json.loads((tmp_path / "slow.json").read_text())["error"] == "exit 124"
