"""An experiment's results: one row per trial (results.csv / results.json), the paper's Table 1
layout, a convergence figure, per-noise-level yardsticks, and the best checkpoint."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import warnings
from pathlib import Path

from rich.table import Table

from raydiff.config import Config, apply_overrides, config_keys
from raydiff.console import fmt
from raydiff.eval.report import json_ready
from raydiff.files import write_atomic
from raydiff.train.checkpoint import CheckpointError, SkippedCheckpoint, good_checkpoint
from raydiff.train.trainer import read_reports


def _first_step(reports: list[dict], key: str, reached) -> int | None:
    return next((int(r["step"]) for r in reports if key in r and reached(r[key])), None)


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def trial_rows(experiment) -> list[dict]:
    """One dict per trial: searched values, status, reports, steps, best metric, thresholds."""
    cfg: Config = experiment.cfg
    t = cfg.tune
    better = min if t.mode == "min" else max
    rows = []
    for result in experiment.results:
        name = Path(result.path).name
        run_dir = experiment.path / "runs" / name
        reports = read_reports(run_dir)
        evals = [r for r in reports if t.metric in r]
        best = better(evals, key=lambda r: r[t.metric]) if evals else {}
        last = reports[-1] if reports else {}
        steps = int(last.get("step", 0))
        # the embedding diagnostics of the last evaluation: a trial that Tune stops ends with
        # the row of its SIGTERM (train/preemption.py), a training row without them
        diagnosed = next((r for r in reversed(reports) if "emb_norm_mean" in r), {})
        metrics = result.metrics or {}
        row = {"trial": name} | dict(sorted(result.config.items())) | {
            "status": "error" if result.error else "done",
            "iterations": int(metrics.get("training_iteration", len(reports))),
            "steps": steps,
            "stopped_early": bool(not result.error and steps < cfg.train.max_steps),
            f"best_{t.metric}": best.get(t.metric, math.nan),
            "val_mse_over_z0_sq": best.get("val_mse_over_z0_sq", math.nan),
            "val_token_accuracy": best.get("val_token_accuracy", math.nan),
            # at abar = 1/2, the same noise level for every schedule: comparable across them
            "val_mse_abar50": best.get("val_mse_abar50", math.nan),
            "val_token_accuracy_abar50": best.get("val_token_accuracy_abar50", math.nan),
            "emb_norm_mean": diagnosed.get("emb_norm_mean", math.nan),
            "emb_norm_ratio": diagnosed.get("emb_norm_ratio", math.nan),
            "emb_scale_ratio": diagnosed.get("emb_scale_ratio", math.nan),
            "emb_effective_rank": diagnosed.get("emb_effective_rank", math.nan),
            # the collapse rule (eval.metrics.is_collapsed) at any evaluation, and the first
            "collapsed_at_step": _first_step(reports, "emb_collapsed", lambda v: v >= 1),
            "starts": _count_lines(run_dir / "starts.log"),
            f"steps_to_accuracy_{t.accuracy_threshold:g}": _first_step(
                evals, "val_token_accuracy", lambda v: v >= t.accuracy_threshold),
        }
        row["collapsed"] = row["collapsed_at_step"] is not None
        if t.metric_threshold is not None:
            reached = ((lambda v: v <= t.metric_threshold) if t.mode == "min"
                       else (lambda v: v >= t.metric_threshold))
            row[f"steps_to_{t.metric}_{t.metric_threshold:g}"] = _first_step(
                evals, t.metric, reached)
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def curves(experiment, key: str = "val_mse") -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every evaluation of each trial."""
    return {Path(r.path).name: [(int(x["step"]), x[key]) for x in
                                read_reports(experiment.path / "runs" / Path(r.path).name)
                                if key in x] for r in experiment.results}


def abar_yardsticks(experiment, max_examples: int = 1000) -> dict[str, list[dict]]:
    """Token accuracy and mse per abar bucket of each trial's last checkpoint on the valid
    split: comparable across schedules, unlike raw validation mse."""
    from raydiff.data.sources import output_location
    from raydiff.eval.evaluate import held_out_blocks
    from raydiff.eval.loading import load_diffusion
    from raydiff.eval.scoring import score_in_process, summarize_scores

    out = {}
    for result in experiment.results:
        name = Path(result.path).name
        checkpoint = _newest_good(experiment.path / "runs" / name)
        if checkpoint is None:
            continue
        loaded = load_diffusion(checkpoint)
        data_path = output_location(apply_overrides(experiment.cfg, result.config).data).uri
        blocks, _ = held_out_blocks(data_path, loaded, split="valid", max_examples=max_examples)
        out[name] = summarize_scores(score_in_process(loaded, blocks, seed=0))["by_abar"]
    return out


def _newest_good(run_dir: Path) -> Path | None:
    """A trial run's newest good checkpoint (damaged ones named in a warning); None if none."""
    try:
        return good_checkpoint(run_dir) if run_dir.exists() else None
    except CheckpointError as e:
        warnings.warn(str(e), SkippedCheckpoint, stacklevel=2)
        return None


def copy_best_checkpoint(experiment, rows: list[dict]) -> Path | None:
    """The best trial's newest good checkpoint, copied whole to <experiment>/best_checkpoint."""
    key = f"best_{experiment.cfg.tune.metric}"
    scored = [r for r in rows if isinstance(r[key], float) and math.isfinite(r[key])]
    if not scored:
        return None
    pick = min if experiment.cfg.tune.mode == "min" else max
    best = pick(scored, key=lambda r: r[key])
    source = _newest_good(experiment.path / "runs" / best["trial"])
    if source is None:
        return None
    target = experiment.path / "best_checkpoint"
    tmp = target.with_name(".best_checkpoint.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    (tmp / "FROM").write_text(f"{best['trial']}\n{source}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def write_results(experiment, rows: list[dict], yardsticks: dict | None = None) -> None:
    path = experiment.path
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path / "results.csv", table.getvalue())
    payload = {"trials": rows, "by_abar": yardsticks or {},
               "curves": {k: v for k, v in curves(experiment).items()}}
    write_atomic(path / "results.json", json.dumps(json_ready(payload), indent=2))


def plot_convergence(experiment, out: Path, key: str = "val_mse", log_y: bool = True) -> Path:
    """`key` at each evaluation against step, one line per trial, one panel per loss (Figure 3
    for val_mse; the collapse study's figures for the embedding diagnostics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_trial = {Path(r.path).name: r.config for r in experiment.results}
    data = curves(experiment, key)
    losses = sorted({c.get("diffusion.loss", experiment.cfg.diffusion.loss)
                     for c in by_trial.values()})
    fig, axes = plt.subplots(1, len(losses), figsize=(5.5 * len(losses), 4), squeeze=False)
    for ax, loss in zip(axes[0], losses, strict=True):
        for name, points in sorted(data.items()):
            config = by_trial[name]
            if config.get("diffusion.loss", experiment.cfg.diffusion.loss) != loss or not points:
                continue
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(config.items())
                              if k != "diffusion.loss")
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", markersize=3, label=label or name)
        ax.set_title(f"loss = {loss}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {key.removeprefix('val_')}" if key.startswith("val_")
                      else key)
        ax.set_yscale("log" if log_y else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- rich tables


def trials_table(rows: list[dict], metric: str) -> Table:
    """Per trial: searched values, reports, steps, stopped early, best metric, mse / z0^2,
    token accuracy, steps to the thresholds (results.csv has every column)."""
    table = Table(title="trials")
    if not rows:
        return table
    searched = [k for k in rows[0] if k in config_keys()]
    thresholds = [k for k in rows[0] if k.startswith("steps_to_")]
    columns = [(k, k.rsplit(".", 1)[-1]) for k in searched] + [
        ("iterations", "reports"), ("steps", "steps"), ("stopped_early", "stopped early"),
        (f"best_{metric}", f"best {metric}"), ("val_mse_over_z0_sq", "mse / z0^2"),
        ("val_token_accuracy", "token acc"), ("val_mse_abar50", "mse @abar.5"),
        ("val_token_accuracy_abar50", "acc @abar.5"), ("emb_scale_ratio", "scale / scale0"),
        ("collapsed_at_step", "collapsed at")] + [(k, k.replace("_", " "))
                                                          for k in thresholds]
    table.add_column("#")
    for _, title in columns:
        table.add_column(title, justify="right")
    for r in rows:
        style = "red" if r["status"] == "error" else None
        table.add_row(r["trial"].split("_", 1)[0], *[fmt(r[k]) for k, _ in columns],
                      style=style)
    return table


def table1(rows: list[dict], cfg: Config) -> list[Table]:
    """The paper's Table 1: best validation mse, schedule x {rounding, anchor}, per dataset."""
    key = f"best_{cfg.tune.metric}"
    tables = []
    sources = sorted({r.get("data.source", cfg.data.source) for r in rows})
    for source in sources:
        mine = [r for r in rows if r.get("data.source", cfg.data.source) == source]
        losses = sorted({r.get("diffusion.loss", cfg.diffusion.loss) for r in mine})
        schedules = sorted({r.get("diffusion.schedule", cfg.diffusion.schedule) for r in mine})
        table = Table(title=f"{cfg.tune.metric} (mse / mean z0^2) on {source}")
        table.add_column("schedule")
        for loss in losses:
            table.add_column(loss, justify="right")
        for schedule in schedules:
            cells = []
            for loss in losses:
                hits = [r for r in mine
                        if r.get("diffusion.loss", cfg.diffusion.loss) == loss
                        and r.get("diffusion.schedule", cfg.diffusion.schedule) == schedule]
                cells.append(" / ".join(f"{fmt(h[key])} ({fmt(h['val_mse_over_z0_sq'])})"
                                        for h in hits) or "-")
            table.add_row(schedule, *cells)
        tables.append(table)
    return tables


def yardstick_table(yardsticks: dict[str, list[dict]]) -> Table:
    table = Table(title="token accuracy by abar bucket (lower edge shown), last checkpoints")
    table.add_column("#")
    first = next(iter(yardsticks.values()), [])
    for b in first:
        table.add_column(f"{b['abar_lo']:.1f}", justify="right")
    for name, buckets in sorted(yardsticks.items()):
        table.add_row(name.split("_", 1)[0],
                      *[f"{b['token_accuracy']:.2f}" if b["count"] else "-" for b in buckets])
    return table


def finish(experiment, with_yardsticks: bool = True) -> dict:
    """Write every result file of an experiment; returns what the CLI shows."""
    rows = trial_rows(experiment)
    yardsticks = abar_yardsticks(experiment) if with_yardsticks else {}
    write_results(experiment, rows, yardsticks)
    plot = plot_convergence(experiment, experiment.path / "convergence.png")
    if any(not math.isnan(r["emb_scale_ratio"]) for r in rows):  # the collapse diagnostics
        for key, name, log_y in (("emb_scale_ratio", "scale", True),
                                 ("emb_effective_rank", "rank", False)):
            plot_convergence(experiment, experiment.path / f"collapse-{name}.png", key, log_y)
    best = copy_best_checkpoint(experiment, rows)
    return {"rows": rows, "yardsticks": yardsticks, "plot": plot, "best_checkpoint": best}
