import subprocess
import sys

import pytest

from raydiff.config import ConfigError, apply_overrides, config_keys, load_config
from tests.conftest import ROOT

ALL_YAMLS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.data.seq_len >= 2


def test_paper_recipe_configs():
    for name in ("reuters", "ccnews"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert (cfg.data.seq_len, cfg.train.batch_size, cfg.data.vocab_size) == (32, 64, 10000)
        assert cfg.diffusion.num_steps == 2000 and cfg.optim.lr == 1e-4
        assert cfg.optim.anneal_steps == 25000 and cfg.optim.weight_decay == 0.0008
        assert cfg.model.dropout == 0.1 and cfg.model.embed_dim == 128
        assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads) == (768, 12, 12)


def test_overrides_parse_yaml_scalars():
    cfg = load_config(ROOT / "configs" / "smoke.yaml",
                      ["train.max_steps=7", "optim.lr=1e-3", "diffusion.perturb_z0=false",
                       "data.max_articles=null", "diffusion.loss=rounding"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3
    assert cfg.diffusion.perturb_z0 is False and cfg.data.max_articles is None
    assert cfg.diffusion.loss == "rounding"
    assert apply_overrides(cfg, {"model.embed_norm": "before_proj"}).model.embed_norm == "before_proj"


@pytest.mark.parametrize(("override", "message"), [
    ("model.hiden_size=8", "unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
    ("training.max_steps=8", "unknown key 'training'"),
    ("train.max_steps=abc", "train.max_steps must be int, got 'abc'"),
    ("train.max_steps=1.5", "train.max_steps must be int"),
    ("diffusion.perturb_z0=3", "diffusion.perturb_z0 must be bool"),
    ("diffusion.schedule=cosin", "diffusion.schedule='cosin' is not one of 'linear'"),
    ("optim.lr=-1", "optim.lr=-1.0 must be > 0.0"),
    ("model.dropout=1.5", "model.dropout=1.5 must be <= 1.0"),
    ("model.num_heads=5", "model.num_heads=5 must divide model.hidden_size=64"),
    ("diffusion.num_steps=10", "diffusion.num_steps=10 must be > 10 for pw_lin"),
    ("train.max_steps", "expected dotted key=value"),
])
def test_bad_keys_types_and_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "smoke.yaml", [override])
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    assert "smoke.yaml" in text or text.startswith("override")


def test_bad_yaml_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 8\n   oops: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  max_stpes: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown key 'train.max_stpes' "
                                          r"\(did you mean 'train.max_steps'\?\)"):
        load_config(unknown)


def test_every_key_is_overridable():
    cfg = load_config()
    for key in config_keys():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        assert getattr(getattr(apply_overrides(cfg, {key: value}), section), name) == value


@pytest.mark.ray
def test_cli_reports_config_errors_in_one_line_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "raydiff.cli", "train", "--config",
         str(ROOT / "configs" / "smoke.yaml"), "optim.lrr=1"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'optim.lr'" in lines[0]


def test_schedule_choices_are_the_schedules_modules_names_and_need_no_torch():
    """The config validates schedule names and lengths against raydiff.diffusion.betas, which
    must stay importable without torch (Ray Data workers of `prepare` load configs)."""
    import typing

    from raydiff.config.schema import DiffusionConfig
    from raydiff.diffusion import SCHEDULE_NAMES, get_named_beta_schedule, min_num_steps

    hint = typing.get_type_hints(DiffusionConfig)["schedule"]
    assert typing.get_args(hint) == SCHEDULE_NAMES
    code = ("import sys, raydiff.config as c; c.load_config(None, ['diffusion.schedule=cosine']);"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for name in SCHEDULE_NAMES:  # every name the config accepts builds at its shortest T
        steps = min_num_steps(name)
        cfg = load_config(None, [f"diffusion.schedule={name}", f"diffusion.num_steps={steps}"])
        assert get_named_beta_schedule(name, cfg.diffusion.num_steps).shape == (steps,)
