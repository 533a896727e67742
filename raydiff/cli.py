"""`raydiff` sub-commands. Thin: parse arguments, load the config, call the component's run."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.table import Table

from raydiff.config import ConfigError, apply_overrides, load_config


def _quiet_ray_logs() -> None:
    """Ray Data and Ray Train log progress at INFO; the CLI shows its own summary instead."""
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file under configs/ (defaults if omitted)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 diffusion.loss=rounding")


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from raydiff.train.checkpoint import latest_checkpoint
    from raydiff.train.engine import NonFiniteLossError
    from raydiff.train.local import run_directory, train_local

    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg = apply_overrides(cfg, {"ray.address": args.address})
    try:
        if args.no_ray:
            run = train_local(cfg, console=console)
            metrics, steps = run.result.last_metrics, run.result.step
        else:
            from raydiff.train.trainer import train_on_ray

            _quiet_ray_logs()
            with console.status(f"training {cfg.train.run_name} on Ray "
                                f"({cfg.ray.num_workers} workers)"):
                run = train_on_ray(cfg)
            metrics, steps = run.metrics, int(run.metrics.get("step", 0))
    except NonFiniteLossError as e:
        last = latest_checkpoint(run_directory(cfg))
        console.print(f"[red]error:[/red] {e}; training stopped, last good checkpoint: {last}",
                      soft_wrap=True)
        return 3
    table = Table(title=f"run {cfg.train.run_name}", show_header=False)
    table.add_row("run directory", str(run.run_dir))
    table.add_row("steps", str(steps))
    for key in ("best_val_loss", "val_mse", "val_token_accuracy", "emb_norm_mean",
                "tokens_per_s"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    table.add_row("metrics", str(run.run_dir / "metrics.jsonl"))
    table.add_row("last checkpoint", str(run.last_checkpoint))
    console.print(table)
    return 0


def cmd_prepare(args: argparse.Namespace, console: Console) -> int:
    import ray
    from ray.data import DataContext

    from raydiff.data.pipeline import output_location, prepare

    cfg = load_config(args.config, args.overrides)
    output_location(cfg.data)  # a missing path or unreachable S3 fails here, before Ray starts
    _quiet_ray_logs()
    ray.init(address=args.address or cfg.ray.address or "local", include_dashboard=False,
             log_to_driver=False)
    DataContext.get_current().enable_progress_bars = console.is_terminal
    with console.status(f"preparing {cfg.data.source} with Ray Data"):
        prepared = prepare(cfg.data)
    m = prepared.manifest
    table = Table(title=f"prepared data{' (already complete)' if prepared.reused else ''}",
                  show_header=False)
    table.add_row("output", prepared.path)
    table.add_row("articles / lines read", f"{m['articles']} / {m['lines']}")
    table.add_row("skipped", ", ".join(f"{k} {v}" for k, v in m["skipped"].items()))
    table.add_row("segments (before dedup)", f"{m['segments']} ({m['segments_before_dedup']})")
    for split, s in m["splits"].items():
        table.add_row(f"  {split}", f"{s['segments']} segments, {s['tokens']} tokens, "
                                    f"{len(s['shards'])} shards")
    table.add_row("vocabulary", str(m["vocab_size"]))
    table.add_row("OOV rate / pad fraction", f"{m['oov_rate']:.4f} / {m['pad_fraction']:.4f}")
    table.add_row("seconds", f"{m['seconds']:.1f}")
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a diffusion LM (on Ray Train)")
    _add_config_args(train)
    train.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    train.add_argument("--no-ray", action="store_true",
                       help="train in this one process, without Ray")
    train.set_defaults(func=cmd_train)
    prep = sub.add_parser("prepare", help="clean, segment and tokenize a corpus with Ray Data")
    _add_config_args(prep)
    prep.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    prep.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        return args.func(args, console)
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}", soft_wrap=True)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
