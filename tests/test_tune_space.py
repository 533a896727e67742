"""The YAML search-space loader: every mistake is a one-line error naming the key."""

import pytest

from raydiff.config import ConfigError, load_config
from raydiff.tune.space import param_space, trial_count, validate_search_space
from tests.conftest import ROOT


@pytest.fixture
def base():
    return load_config(ROOT / "configs" / "tune" / "smoke.yaml")


@pytest.mark.parametrize("space, message", [
    ({"diffusion.schedul": {"grid": ["linear"]}},
     r"tune.search_space.diffusion.schedul: not a config key \(did you mean 'diffusion.schedule'\?\)"),
    ({"diffusion.schedule": ["linear", "cosine"]},
     r"tune.search_space.diffusion.schedule: expected one of \{grid\|choice"),
    ({"diffusion.schedule": {"gird": ["linear"]}},
     r"tune.search_space.diffusion.schedule: unknown kind 'gird'; valid: grid, choice"),
    ({"diffusion.schedule": {"grid": []}},
     r"tune.search_space.diffusion.schedule: grid needs a non-empty list"),
    ({"diffusion.schedule": {"grid": ["linear", "cosin"]}},
     r"tune.search_space.diffusion.schedule: value 'cosin' is invalid"),
    ({"diffusion.loss": {"choice": ["anchor", "l2"]}},
     r"tune.search_space.diffusion.loss: value 'l2' is invalid"),
    ({"optim.lr": {"uniform": [1e-3, 1e-4]}},
     r"tune.search_space.optim.lr: uniform needs \[lo, hi\] numbers with lo < hi"),
    ({"optim.lr": {"loguniform": [0, 1e-3]}}, r"loguniform needs lo > 0"),
    ({"model.num_layers": {"randint": [1.5, 4]}}, r"randint needs integer ends"),
    ({"diffusion.noise_factor": {"uniform": [-1.0, 2.0]}},
     r"tune.search_space.diffusion.noise_factor: value -1.0 is invalid: .*must be > 0"),
    ({"tune.metric": {"grid": ["val_loss"]}}, r"tune.metric: tune.\* and ray.\* keys"),
    ({"diffusion.num_steps": {"grid": [8]}}, r"value 8 is invalid: .*> 10 for pw_lin"),
])
def test_bad_spaces_fail_in_one_line(base, space, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate_search_space(space, base)
    assert "\n" not in str(info.value)


def test_grid_choice_and_ranges_become_tune_domains(base):
    from ray import tune

    space = param_space({
        "diffusion.schedule": {"grid": ["linear", "pw_lin"]},
        "model.embed_norm": {"choice": ["none", "after_proj"]},
        "diffusion.noise_factor": {"uniform": [1.0, 4.0]},
        "optim.lr": {"loguniform": [1e-4, 1e-3]},
        "model.num_layers": {"randint": [1, 3]},
    }, base)
    assert space["diffusion.schedule"] == {"grid_search": ["linear", "pw_lin"]}
    assert isinstance(space["model.embed_norm"], tune.search.sample.Categorical)
    assert space["diffusion.noise_factor"].lower == 1.0 and space["diffusion.noise_factor"].upper == 4.0
    assert isinstance(space["optim.lr"].get_sampler(), tune.search.sample.LogUniform)
    assert space["model.num_layers"].upper == 3


def test_shipped_ablation_is_the_twelve_trial_grid():
    cfg = load_config(ROOT / "configs" / "tune" / "ablation.yaml")
    space = validate_search_space(cfg.tune.search_space, cfg)
    assert space["diffusion.schedule"] == ("grid", ["linear", "cosine", "sqrt", "trunc_cos",
                                                    "trunc_lin", "pw_lin"])
    assert space["diffusion.loss"] == ("grid", ["rounding", "anchor"])


def test_shipped_collapse_study_loads_and_compares_arms_at_equal_steps():
    cfg = load_config(ROOT / "configs" / "tune" / "collapse.yaml")
    space = validate_search_space(cfg.tune.search_space, cfg)
    assert space["diffusion.loss"] == ("grid", ["none", "rounding", "anchor"])
    assert space["model.embed_norm"] == ("grid", ["none", "before_proj"])
    kind, inits = space["model.embed_init_std"]
    assert kind == "grid" and len(inits) >= 2 and min(inits) < 1.0
    assert trial_count(cfg.tune.search_space, cfg, cfg.tune.num_samples) == 12
    # one step budget for every arm: no early stopping of any kind
    assert cfg.tune.scheduler == "fifo" and cfg.train.patience == 0
    assert cfg.data.source.endswith("reuters21578.jsonl.gz")
