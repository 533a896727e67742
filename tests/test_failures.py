"""The failures that probing found, hit as a user hits them: each ends in one clear line (no
traceback), quickly, with nothing lost and nothing half-written that looks complete."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydiff.config import ConfigError, apply_overrides, load_config
from raydiff.errors import RaydiffError
from raydiff.runtime import check_answers
from tests.conftest import ROOT

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raydiff.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env=os.environ | {"COLUMNS": "400"} | (env or {}))


def _lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.strip()]


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = _lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _damage(ckpt: Path) -> None:
    state = ckpt / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


# ------------------------------------------------------------- 1. non-finite numbers


@pytest.mark.parametrize("override", [
    "model.dropout=nan", "optim.lr=inf", "optim.lr=-.inf", "diffusion.noise_factor=.nan",
    "optim.lr=1e999", "ray.cpus_per_worker=.inf", "tune.reduction_factor=.inf"])
def test_non_finite_numbers_are_rejected_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=.* must be a finite number"):
        load_config(SMOKE, [override])


def test_non_finite_numbers_inside_lists_dicts_and_search_spaces_are_rejected():
    from raydiff.tune.space import validate_search_space

    with pytest.raises(ConfigError, match="ray.batch_shares"):
        load_config(SMOKE, ["ray.batch_shares=[.nan, 1]"])
    with pytest.raises(ConfigError, match="ray.worker_resources.slot"):
        load_config(SMOKE, ["ray.worker_resources.slot=.inf"])
    base = load_config(SMOKE)
    for spec in ({"grid": [1e-3, float("nan")]}, {"uniform": [1e-4, float("inf")]}):
        with pytest.raises(ConfigError, match="tune.search_space.optim.lr.*finite"):
            validate_search_space({"optim.lr": spec}, base)
    with pytest.raises(ConfigError, match="tune.search_space.optim.lr"):
        validate_search_space({"optim.lr": {"uniform": [float("nan"), 1.0]}}, base)


@pytest.mark.ray
def test_cli_rejects_nan_before_writing_anything(tmp_path):
    proc = _cli("train", "--config", SMOKE, "--no-ray", "model.dropout=nan",
                f"train.output_dir={tmp_path / 'runs'}", f"data.out_dir={tmp_path / 'data'}")
    assert proc.returncode == 2
    _one_line(proc, "model.dropout=nan must be a finite number")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


# ---------------------------------------------------- 2. damaged input files, data.strict


@pytest.mark.ray
def test_a_truncated_archive_is_skipped_named_and_strict_makes_it_an_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with gzip.open(src / "good.jsonl.gz", "wt") as f:
        for i in range(30):
            f.write(json.dumps({"id": f"g{i}", "text": f"a good article number {i} here"}) + "\n")
    whole = gzip.compress(b"".join(json.dumps({"id": f"t{i}", "text": "lost words here"})
                                   .encode() + b"\n" for i in range(30)))
    (src / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    common = ["--no-ray", f"data.source={src}", f"data.out_dir={tmp_path / 'out'}",
              "data.valid_fraction=0.2"]

    strict = _cli("prepare", *common, "data.strict=true")
    assert strict.returncode == 2
    _one_line(strict, "data.strict", "cut.jsonl.gz", "damaged")
    assert not list((tmp_path / "out").rglob("manifest.json"))  # nothing looks complete

    lenient = _cli("prepare", *common)
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    warnings = [line for line in _lines(lenient) if "warning" in line]
    assert len(warnings) == 1 and "cut.jsonl.gz" in warnings[0]
    manifest = json.loads(next((tmp_path / "out").rglob("manifest.json")).read_text())
    assert manifest["articles"] == 30 and manifest["skipped"]["corrupt_file"] == 1
    assert manifest["skipped_files"][0]["path"].endswith("cut.jsonl.gz")

    # the complete (lenient) output is not reused by a strict run either, nor removed by it
    again = _cli("prepare", *common, "data.strict=true")
    assert again.returncode == 2 and "cut.jsonl.gz" in _one_line(again)
    assert next((tmp_path / "out").rglob("manifest.json")).exists()


# --------------------------------------------------------------- 3. damaged checkpoints


@pytest.mark.ray
def test_damaged_checkpoints_are_skipped_on_resume_sample_and_never_overwritten(tmp_path):
    run_dir = tmp_path / "runs" / "smoke"
    common = ["--config", SMOKE, "--no-ray",  # overrides after a flag (point 7)
              f"train.output_dir={tmp_path / 'runs'}", f"data.out_dir={tmp_path / 'data'}",
              "data.synthetic_size=100", "train.checkpoint_every=5", "train.log_every=5",
              "train.eval_every=10", "train.checkpoints_to_keep=2"]
    first = _cli("train", *common, "train.max_steps=20")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    # one keep-limit on both paths; directories as open as the umask allows (not 0700)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000015", "step_00000020"]
    umask = os.umask(0)
    os.umask(umask)
    assert (ckpts / "step_00000020").stat().st_mode & 0o777 == 0o777 & ~umask

    _damage(ckpts / "step_00000020")
    resumed = _cli("train", *common, "train.max_steps=25")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warned = [line for line in _lines(resumed) if "warning" in line]
    assert len(warned) == 1 and "step_00000020" in warned[0] and "truncated" in warned[0]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [5, 10, 15, 20, 20, 25]  # resumed from step 15, not from scratch

    _damage(ckpts / "step_00000025")
    sampled = _cli("sample", "--checkpoint", str(run_dir), "--num-samples", "2",
                   "--steps", "500")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    warned = [line for line in _lines(sampled) if "warning" in line]
    assert any("step_00000025" in line for line in warned)
    assert any("--steps 500 exceeds the model's T = 200" in line for line in warned)
    assert "step_00000020" in sampled.stdout  # sampled from the newest good one

    _damage(ckpts / "step_00000020")
    before = _tree_digest(ckpts)
    none_left = _cli("train", *common, "train.max_steps=30")
    assert none_left.returncode == 2
    _one_line(none_left, "none of its 2 checkpoints is intact", "nothing was overwritten")
    assert _tree_digest(ckpts) == before
    explicit = _cli("sample", "--checkpoint", str(ckpts / "step_00000020"))
    assert explicit.returncode == 2
    _one_line(explicit, "step_00000020", "state.pt has")


def test_ray_resume_skips_a_damaged_checkpoint(ray_session, smoke_cfg):
    from raydiff.train.checkpoint import CheckpointError, SkippedCheckpoint, load_checkpoint
    from raydiff.train.trainer import train_on_ray

    cfg = apply_overrides(smoke_cfg, {
        "data.synthetic_size": 100, "ray.num_workers": 1, "train.max_steps": 10,
        "train.checkpoint_every": 5, "train.log_every": 5, "train.eval_every": 10})
    first = train_on_ray(cfg)
    _damage(first.run_dir / "step_00000010")
    with pytest.warns(SkippedCheckpoint, match="step_00000010"):
        resumed = train_on_ray(apply_overrides(cfg, {"train.max_steps": 15}))
    steps = [json.loads(line)["step"] for line in (resumed.run_dir / "metrics.jsonl").open()]
    assert steps == [5, 10, 10, 15]  # from step 5
    state, _, _, ckpt = load_checkpoint(resumed.run_dir)
    assert state["step"] == 15 and ckpt.name == "step_00000015"

    for name in ("step_00000005", "step_00000010", "step_00000015"):
        if (resumed.run_dir / name).exists():
            _damage(resumed.run_dir / name)
    before = _tree_digest(resumed.run_dir)
    with pytest.raises(CheckpointError, match="checkpoints is intact"):
        train_on_ray(apply_overrides(cfg, {"train.max_steps": 20}))
    assert _tree_digest(resumed.run_dir) == before


# ------------------------------------------------------------------ 4. credentials


@pytest.mark.parametrize("value", ["12345678", "[98765432]", "{k: 55554444}", "true"])
def test_credential_values_never_appear_in_errors(value):
    for key in ("data.s3_secret_access_key", "data.s3_access_key_id"):
        with pytest.raises(ConfigError) as error:
            load_config(None, [f"{key}={value}"])
        assert key in str(error.value)
        for secret in ("12345678", "98765432", "55554444", "True"):
            assert secret not in str(error.value)


@pytest.mark.ray
def test_credential_in_a_malformed_override_is_not_echoed():
    proc = _cli("prepare", "--no-ray", "data.s3_secret_access_key:hunter2hunter2")
    assert proc.returncode == 2
    assert "hunter2" not in _one_line(proc, "expected dotted key=value")


# ------------------------------------------------- 5, 6. RAY_ADDRESS, unreachable clusters


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["train, RAY_ADDRESS", "prepare, RAY_ADDRESS",
                                 "prepare --address"])
def test_an_address_where_nothing_listens_fails_at_once_naming_it(how, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    command, _, via = how.partition(", ")
    args = [command.split()[0], "--config", SMOKE, f"data.out_dir={tmp_path / 'data'}",
            f"train.output_dir={tmp_path / 'runs'}"]
    env = {"RAY_ADDRESS": address} if via == "RAY_ADDRESS" else {}
    if "--address" in command:
        args += ["--address", address]
    started = time.monotonic()
    proc = _cli(*args, env=env, timeout=90)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2
    line = [line for line in _lines(proc) if "error" in line]
    assert len(line) == 1 and f"Ray address {address}: cannot connect" in line[0]
    assert elapsed < 60, elapsed  # Ray's own retries took minutes


def test_the_address_check_passes_a_gcs_only_and_is_bounded(ray_session):
    check_answers(ray_session.get_runtime_context().gcs_address, 5.0)  # the session's Ray
    with socket.socket() as server:  # something listens, but it is not Ray
        server.bind(("127.0.0.1", 0))
        server.listen()
        with pytest.raises(RaydiffError, match="no Ray GCS answers there"):
            check_answers(f"127.0.0.1:{server.getsockname()[1]}", 1.0)
        check_answers(f"ray://127.0.0.1:{server.getsockname()[1]}", 1.0)  # a port is all
    started = time.monotonic()
    # unroutable: no answer within the timeout, no route at once, or (behind a proxy that
    # accepts every connection, as on some build machines) no Ray GCS
    with pytest.raises(RaydiffError, match=r"10\.255\.255\.1:6379: cannot connect \("):
        check_answers("10.255.255.1:6379", 1.0)
    assert time.monotonic() - started < 20  # Ray's client adds a few seconds of its own
    with pytest.raises(RaydiffError, match="expected host:port"):
        check_answers("nonsense", 1.0)
    with pytest.raises(RaydiffError, match="dashboard"):
        check_answers("http://127.0.0.1:8265", 1.0)


# --------------------------------------------------------------------- 7. the rest


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ctrl_c_during_ray_start_up_exits_130_without_a_crash(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "raydiff.cli", "train", "--config", SMOKE,
         f"train.output_dir={tmp_path / 'runs'}", f"data.out_dir={tmp_path / 'data'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env=os.environ | {"RAY_ADDRESS": ""})
    try:
        seen = []
        for line in proc.stdout:  # "training smoke on Ray ..." comes just before Ray starts
            seen.append(line)
            if "on Ray" in line:
                break
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground group
        rest = proc.communicate(timeout=90)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted" in output and "Traceback" not in output
    assert not list((tmp_path / "runs").rglob("state.pt"))


@pytest.mark.ray
def test_a_config_without_a_model_section_says_it_trains_the_default(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = _cli("train", "--config", str(empty), "--no-ray",
                f"data.source={tmp_path / 'missing.jsonl'}", f"data.out_dir={tmp_path / 'd'}",
                f"train.output_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2  # the missing corpus stops it, after the notice
    lines = _lines(proc)
    assert len(lines) == 2 and "BERT-base" in lines[0] and "missing.jsonl" in lines[1]
    quiet = _cli("train", "--config", SMOKE, "--no-ray",
                 f"data.source={tmp_path / 'missing.jsonl'}", f"data.out_dir={tmp_path / 'd'}",
                 f"train.output_dir={tmp_path / 'runs'}")
    assert len(_lines(quiet)) == 1


@pytest.mark.ray
def test_an_empty_validation_split_is_warned_about(tmp_path):
    proc = _cli("prepare", "--config", SMOKE, "--no-ray", "data.valid_fraction=0",
                f"data.out_dir={tmp_path / 'data'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in _lines(proc) if "warning" in line]
    assert len(warnings) == 1 and "validation split is empty" in warnings[0]
