"""`raydiff tune`: the noise-schedule x loss ablation (or any sweep over config keys) on Ray Tune.

Each trial runs a small driver function that builds and fits the same TorchTrainer as
`raydiff train` (Ray Train V2's pattern: `TuneReportCallback` forwards every report to Tune,
so ASHA can stop trials on validation loss). Layout of an experiment:

    <tune.output_dir>/<train.run_name>/
      ablation.yaml          the base config (what --resume reads back)
      <Tune's own state>     experiment state, one directory per trial
      runs/<trial name>/     each trial's Ray Train run: metrics.jsonl, step_* checkpoints
      results.csv  results.json  convergence.png  best_checkpoint/

Trial names are derived from the trial's index and searched values, never from a clock, so
that `raydiff tune --resume DIR` finds every trial (and its Train run) again.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from raydiff.config import Config, ConfigError, apply_overrides, build_config, load_config
from raydiff.runtime import TRIAL_DRIVER_RESOURCE, start_ray
from raydiff.train.trainer import build_trainer, check_resources, prepared_data
from raydiff.tune.space import param_space, trial_count

BASE_CONFIG = "ablation.yaml"


def trial_name(trial) -> str:
    """'003_schedule=cosine_loss=anchor': the trial's index, then its searched values."""
    index = int(trial.trial_id.rsplit("_", 1)[-1])
    values = "_".join(f"{key.rsplit('.', 1)[-1]}={_short(value)}"
                      for key, value in sorted(trial.config.items()))
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", f"{index:03d}_{values}")[:120]


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_trial(config: dict, base: dict, experiment_dir: str, data_path: str | None,
              vocab_size: int | None) -> None:
    """One trial (a Tune function trainable): a Ray Train run of the base config with this
    trial's values. A restored trial resumes its Train run from the latest checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = apply_overrides(build_config(base, origin="tune trial"), config)
    if data_path is None:  # the search space changes the data: each trial prepares its own
        data_path, manifest = prepared_data(cfg)
        vocab_size = manifest["vocab_size"]
    run_dir = Path(experiment_dir) / "runs" / ray.tune.get_context().get_trial_name()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "starts.log", "a") as f:  # one line per (re)start of this trial
        f.write(f"{time.time():.3f}\n")
    trainer = build_trainer(cfg, data_path, vocab_size, run_dir,
                            callbacks=[TuneReportCallback()])
    trainer.fit()


DATA_CPUS = 1.0  # kept free of training workers for the trials' Ray Data reads


def concurrent_trials(cfg: Config) -> int:
    """How many trials' worker groups fit the cluster at once, leaving `DATA_CPUS` for the
    Ray Data tasks that feed them (with every CPU held by a worker, those tasks never run and
    every trial waits forever). At least one trial always runs."""
    import ray

    total = ray.cluster_resources()
    per_trial_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    fit = int((total.get("CPU", 0) - DATA_CPUS) // per_trial_cpu + 1e-9)
    if cfg.ray.use_gpu:
        fit = min(fit, int(total.get("GPU", 0) // cfg.ray.num_workers))
    for name, amount in cfg.ray.worker_resources.items():
        fit = min(fit, int(total.get(name, 0) // (amount * cfg.ray.num_workers) + 1e-9))
    if cfg.tune.max_concurrent_trials is not None:
        fit = min(fit, cfg.tune.max_concurrent_trials)
    return max(fit, 1)  # check_resources has already failed if not even one fits


@dataclass
class Experiment:
    path: Path
    cfg: Config
    results: list  # ray.tune.Result per trial
    interrupted: bool  # stopped (Ctrl-C) before every trial ended: continue with --resume


def run_ablation(cfg: Config | None = None, resume: str | Path | None = None,
                 verbose: int = 1) -> Experiment:
    """Run the sweep `cfg.tune` describes, or continue the one in `resume`."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if resume is not None:
        path = Path(resume).expanduser().resolve()
        if not (path / BASE_CONFIG).exists():
            raise ConfigError(f"{path}: not a raydiff tune experiment (no {BASE_CONFIG})")
        cfg = load_config(path / BASE_CONFIG)
    assert cfg is not None
    space = param_space(cfg.tune.search_space, cfg)  # validated before Ray starts
    if not space:
        raise ConfigError("tune.search_space is empty: nothing to sweep")
    if cfg.ray.elastic:
        raise ConfigError(f"ray.num_workers={cfg.ray.num_workers}: tune trials run fixed-size "
                          f"worker groups; give one number")
    path = Path(cfg.tune.output_dir).expanduser().resolve() / cfg.train.run_name
    if resume is None and (path / BASE_CONFIG).exists():
        raise ConfigError(f"{path} holds an experiment already: continue it with "
                          f"`raydiff tune --resume {path}` or pick another train.run_name")

    # only every train.eval_every-th report carries validation metrics; Tune's strict check
    # would reject the others (ASHA simply waits for the next report that has the metric)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    start_ray(cfg.ray.address, connect_timeout_s=cfg.ray.connect_timeout_s)
    check_resources(cfg)
    path.mkdir(parents=True, exist_ok=True)
    data_path = vocab_size = None
    if not any(key.startswith("data.") for key in space):
        data_path, manifest = prepared_data(cfg)  # once, shared by every trial
        vocab_size = manifest["vocab_size"]
    cfg.save(path / BASE_CONFIG)

    # the driver holds the custom resource, not a CPU (see TRIAL_DRIVER_RESOURCE)
    has_driver_resource = ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) >= 1
    driver = {TRIAL_DRIVER_RESOURCE: 1} if has_driver_resource else {"CPU": 0.01}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), experiment_dir=str(path),
                             data_path=data_path, vocab_size=vocab_size), driver)

    if resume is not None:
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        t = cfg.tune
        scheduler = (ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps,
                                   grace_period=t.grace_period, reduction_factor=t.reduction_factor)
                     if t.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric=t.metric, mode=t.mode, scheduler=scheduler, num_samples=t.num_samples,
                max_concurrent_trials=concurrent_trials(cfg), trial_name_creator=trial_name,
                trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent),
                                      verbose=verbose))
    grid = tuner.fit()
    return Experiment(path, cfg, [grid[i] for i in range(len(grid))], _interrupted(path, cfg))


def _interrupted(path: Path, cfg: Config) -> bool:
    """Whether the saved experiment state (what --resume continues) has trials left to run.
    (After a Ctrl-C, Tune marks its in-memory trials terminated; the saved state does not.)"""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    trials = ExperimentAnalysis(str(path)).trials
    ended = [t for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR)]
    return len(ended) < max(len(trials), trial_count(cfg.tune.search_space, cfg,
                                                      cfg.tune.num_samples))
