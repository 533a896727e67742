"""`raydiff` sub-commands. Thin: parse arguments, load the config, call the component's run."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.console import Console
from rich.table import Table

from raydiff.cluster import ClusterError
from raydiff.config import ConfigError, ModelConfig, apply_overrides, load_config
from raydiff.console import progress_bar, warnings_as_lines
from raydiff.errors import RaydiffError


def _quiet_ray_logs() -> None:
    """Ray Data and Ray Train log progress at INFO; the CLI shows its own summary instead."""
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file under configs/ (defaults if omitted)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 diffusion.loss=rounding")


def _add_address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join: host:port, ray://host:port or "
                                          "auto (default: ray.address, else RAY_ADDRESS, else "
                                          "a local Ray)")


def _notice_default_model(cfg, console: Console) -> None:
    if cfg.model == ModelConfig():
        console.print("[yellow]notice:[/yellow] the config sets nothing under model: training "
                      "the default denoiser, BERT-base sized (12 layers of width 768, ~85M "
                      "parameters)", soft_wrap=True)


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from raydiff.train.checkpoint import latest_checkpoint
    from raydiff.train.engine import NonFiniteLossError
    from raydiff.train.local import run_directory, train_local

    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg = apply_overrides(cfg, {"ray.address": args.address})
    kind = args.kind
    if kind == "diffusion":
        _notice_default_model(cfg, console)
    if kind == "reference" and not cfg.train.run_name.endswith("-reference"):
        # beside the diffusion run it serves, never on top of it
        cfg = apply_overrides(cfg, {"train.run_name": f"{cfg.train.run_name}-reference"})
    try:
        if args.no_ray:
            run_dir = run_directory(cfg)
            run = train_local(cfg, console=console, kind=kind)
            metrics, steps = run.result.last_metrics, run.result.step
        else:
            from raydiff.train.trainer import ray_run_directory, train_on_ray

            run_dir = ray_run_directory(cfg)
            _quiet_ray_logs()
            console.print(f"training {cfg.train.run_name} on Ray ({cfg.ray.num_workers} "
                          f"workers); TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
            run = train_on_ray(cfg, kind=kind, console=console)
            metrics, steps = run.metrics, int(run.metrics.get("step", 0))
    except NonFiniteLossError as e:
        last = latest_checkpoint(run_dir)
        console.print(f"[red]error:[/red] {e}; training stopped, last good checkpoint: {last}",
                      soft_wrap=True)
        return 3
    table = Table(title=f"run {cfg.train.run_name}", show_header=False)
    table.add_row("run directory", str(run.run_dir))
    table.add_row("steps", str(steps))
    for key in ("best_val_loss", "val_mse", "val_token_accuracy", "val_ppl", "emb_norm_mean",
                "tokens_per_s"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    table.add_row("metrics", str(run.run_dir / "metrics.jsonl"))
    table.add_row("last checkpoint", str(run.last_checkpoint))
    if run.last_checkpoint is not None and kind == "diffusion":
        table.add_row("sample with", f"raydiff sample --checkpoint {run.last_checkpoint}")
    console.print(table)
    return 0


def cmd_prepare(args: argparse.Namespace, console: Console) -> int:
    from raydiff.data.sources import output_location

    cfg = load_config(args.config, args.overrides)
    output_location(cfg.data)  # a missing path or unreachable S3 fails here, before Ray starts
    if args.no_ray:
        from raydiff.data.local import prepare_local

        with console.status(f"preparing {cfg.data.source} in this process"):
            prepared = prepare_local(cfg.data)
    else:
        from ray.data import DataContext

        from raydiff.data.pipeline import prepare
        from raydiff.runtime import start_ray

        _quiet_ray_logs()
        start_ray(args.address or cfg.ray.address, connect_timeout_s=cfg.ray.connect_timeout_s,
                  include_dashboard=False)
        DataContext.get_current().enable_progress_bars = console.is_terminal
        with console.status(f"preparing {cfg.data.source} with Ray Data"):
            prepared = prepare(cfg.data)
    m = prepared.manifest
    table = Table(title=f"prepared data{' (already complete)' if prepared.reused else ''}",
                  show_header=False)
    table.add_row("output", prepared.path)
    table.add_row("articles / lines read", f"{m['articles']} / {m['lines']}")
    table.add_row("skipped", ", ".join(f"{k} {v}" for k, v in m["skipped"].items()))
    for damaged in m["skipped_files"]:
        table.add_row("  skipped file", f"{damaged['path']}: {damaged['reason']}")
    table.add_row("segments (before dedup)", f"{m['segments']} ({m['segments_before_dedup']})")
    for split, s in m["splits"].items():
        table.add_row(f"  {split}", f"{s['segments']} segments, {s['tokens']} tokens, "
                                    f"{len(s['shards'])} shards")
    table.add_row("vocabulary", str(m["vocab_size"]))
    table.add_row("OOV rate / pad fraction", f"{m['oov_rate']:.4f} / {m['pad_fraction']:.4f}")
    table.add_row("seconds", f"{m['seconds']:.1f}")
    console.print(table)
    if m["skipped_files"]:
        console.print(f"[yellow]warning:[/yellow] skipped {len(m['skipped_files'])} damaged "
                      "file(s): " + "; ".join(f"{d['path']} ({d['reason']})"
                                              for d in m["skipped_files"]), soft_wrap=True)
    if not m["splits"]["valid"]["segments"]:
        console.print("[yellow]warning:[/yellow] the validation split is empty (raise "
                      "data.valid_fraction); training will validate on the train split",
                      soft_wrap=True)
    return 0


def _add_sampler_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampler (default: the checkpoint's diffusion.* settings)")
    group.add_argument("--sampler", choices=("ddpm", "ddim"))
    group.add_argument("--steps", type=int, help="DDIM steps (DDPM always takes all T)")
    group.add_argument("--eta", type=float, help="DDIM eta in [0, 1]")
    group.add_argument("--precision", choices=("float32", "float64"),
                       help="of the model and the sampler's state (default float32)")
    group.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=None,
                       help="clamp x0hat to the nearest embedding at every step")
    group.add_argument("--clamp-below", type=float, metavar="FRACTION",
                       help="clamp only at steps with t < FRACTION x T (default 1: all)")
    group.add_argument("--no-ema", action="store_true", help="use the raw, not the EMA, weights")


def _sampler_overrides(args: argparse.Namespace) -> dict:
    return {"sampler": args.sampler, "steps": args.steps, "eta": args.eta, "clamp": args.clamp,
            "clamp_below": args.clamp_below, "precision": args.precision}


def cmd_sample(args: argparse.Namespace, console: Console) -> int:
    from raydiff.eval.generate import SamplerSettings, generate, write_samples
    from raydiff.eval.loading import load_diffusion

    loaded = load_diffusion(args.checkpoint, use_ema=not args.no_ema)
    settings = SamplerSettings.of(loaded.cfg.diffusion, **_sampler_overrides(args))
    steps = settings.model_calls(loaded.schedule.num_steps)
    with progress_bar(console) as progress:
        task = progress.add_task(f"{settings.sampler} {steps} steps", total=args.num_samples)
        samples = generate(loaded, args.num_samples, settings, seed=args.seed,
                           batch_size=args.batch_size,
                           on_batch=lambda n: progress.advance(task, n))
    if args.out:
        write_samples(args.out, samples, settings, loaded, args.seed)
    table = Table(title=f"{len(samples)} samples from {loaded.path} (step {loaded.step}, "
                        f"{settings.sampler}, {steps} steps)", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("text")
    for i, s in enumerate(samples[:args.show]):
        table.add_row(str(i), s.text)
    Console().print(table)
    if args.out:
        console.print(f"written to {args.out}")
    return 0


def _add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the samples as JSONL")
    p.add_argument("--show", type=int, default=20, help="samples printed (default 20)")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_sample)


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from raydiff.eval.evaluate import EvalOptions, evaluate
    from raydiff.eval.report import metrics_tables, write_json

    options = EvalOptions(
        split=args.split, max_examples=args.max_examples, num_samples=args.num_samples,
        sampler=_sampler_overrides(args), seed=args.seed, use_ema=not args.no_ema,
        reference=args.reference, batch_size=args.batch_size, use_ray=args.ray,
        ray_min_examples=args.ray_min_examples, address=args.address)
    _quiet_ray_logs()
    with progress_bar(console) as progress:
        tasks: dict[str, object] = {}

        def report(stage: str, advance: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.advance(tasks[stage], advance)

        metrics = evaluate(args.checkpoint, args.data, options, progress=report)
    if args.out:
        write_json(args.out, metrics)
    for table in metrics_tables(metrics):
        Console().print(table)
    if args.out:
        console.print(f"written to {args.out}")
    return 0


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a checkpoint on held-out data and its samples")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--data", required=True,
                   help="a prepared directory, or raw data: files (local or s3://), a hub id, "
                        "or 'synthetic'")
    p.add_argument("--reference", help="reference LM checkpoint (raydiff train-reference); "
                                       "without it gen_ppl and ref_ppl_real are null")
    p.add_argument("--split", default="auto",
                   choices=("auto", "train", "valid", "test", "all"),
                   help="auto: test of a prepared directory, all of raw data")
    p.add_argument("--max-examples", type=int, help="score only the first N blocks")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", choices=("auto", "on", "off"), default="auto",
                   help="score with Ray Data batch inference (auto: from --ray-min-examples)")
    p.add_argument("--ray-min-examples", type=int, default=20_000)
    _add_address_arg(p)
    p.add_argument("--out", help="write the metrics as JSON")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_tune(args: argparse.Namespace, console: Console) -> int:
    from raydiff.tune.ablation import run_ablation
    from raydiff.tune.results import finish, table1, trials_table, yardstick_table

    if args.resume and (args.config or args.overrides):
        raise ConfigError("--resume continues an experiment with its saved config; "
                          "drop --config and overrides")
    cfg = None if args.resume else load_config(args.config, args.overrides)
    if cfg is not None and args.address:
        cfg = apply_overrides(cfg, {"ray.address": args.address})
    if cfg is not None:
        _notice_default_model(cfg, console)
    _quiet_ray_logs()
    experiment = run_ablation(cfg, resume=args.resume, verbose=1 if console.is_terminal else 0)
    if experiment.interrupted:
        console.print(f"interrupted; continue with: raydiff tune --resume {experiment.path}",
                      soft_wrap=True)
        return 130
    with console.status("collecting results"):
        summary = finish(experiment)
    out = Console()
    out.print(trials_table(summary["rows"], experiment.cfg.tune.metric))
    for table in table1(summary["rows"], experiment.cfg):
        out.print(table)
    if summary["yardsticks"]:
        out.print(yardstick_table(summary["yardsticks"]))
    console.print(f"experiment: {experiment.path}\nresults: {experiment.path / 'results.csv'}"
                  f"\nconvergence plot: {summary['plot']}\nbest checkpoint: "
                  f"{summary['best_checkpoint']}", soft_wrap=True)
    return 0


def cmd_cluster_check(args: argparse.Namespace, console: Console) -> int:
    from raydiff.cluster import check_request, load_cluster_file

    cluster = load_cluster_file(args.targets[0])
    cfg = load_config(args.config, args.targets[1:])
    fit = check_request(cfg, cluster)
    table = Table(title=f"{cluster.path} ({cluster.kind}): valid")
    for column in ("node type", "resources", "max nodes", "workers that fit"):
        table.add_column(column)
    for t in cluster.node_types or []:
        table.add_row(t.name, ", ".join(f"{k}={v:g}" for k, v in t.resources.items()),
                      str(t.max_count), str(fit["per_node_type"].get(t.name, "")))
    Console().print(table)
    if cluster.node_types is None:
        console.print("node types are not declared in this file (local provider): resources "
                      "are checked against the running cluster with --address")
    if args.address:
        from raydiff.runtime import start_ray
        from raydiff.train.trainer import check_resources

        start_ray(args.address, connect_timeout_s=cfg.ray.connect_timeout_s)
        check_resources(cfg)
        console.print(f"the running cluster at {args.address} fits the request")
    console.print(f"ok: ray.num_workers={cfg.ray.num_workers} fits "
                  f"({fit['workers_that_fit'] if fit['workers_that_fit'] is not None else '?'} "
                  f"at most)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a diffusion LM (on Ray Train)")
    _add_config_args(train)
    _add_address_arg(train)
    train.add_argument("--no-ray", action="store_true",
                       help="train in this one process, without Ray")
    train.set_defaults(func=cmd_train, kind="diffusion")
    reference = sub.add_parser(
        "train-reference", help="train the reference causal LM (GPT-2 architecture) that "
                                "`raydiff eval` scores samples with; run name <run_name>-reference")
    _add_config_args(reference)
    _add_address_arg(reference)
    reference.add_argument("--no-ray", action="store_true",
                           help="train in this one process, without Ray")
    reference.set_defaults(func=cmd_train, kind="reference")
    tune = sub.add_parser("tune", help="sweep config keys with Ray Tune (the noise-schedule x "
                                       "loss ablation), ASHA early stopping")
    _add_config_args(tune)
    tune.add_argument("--resume", metavar="DIR", help="continue an interrupted experiment")
    _add_address_arg(tune)
    tune.set_defaults(func=cmd_tune)
    cluster = sub.add_parser("cluster", help="cluster files: validate, check a config fits")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    check = cluster_sub.add_parser(
        "check", help="validate a cluster YAML (Ray's schema, or a KubeRay RayCluster) and "
                      "check that a training config's requests fit its node types")
    check.add_argument("--config", help="training config whose requests must fit")
    check.add_argument("targets", nargs="+", metavar="FILE [key=value ...]",
                       help="the cluster YAML, then dotted overrides of the config")
    check.add_argument("--address", help="also check against this running cluster")
    check.set_defaults(func=cmd_cluster_check)
    _add_sample_parser(sub)
    _add_eval_parser(sub)
    prep = sub.add_parser("prepare", help="clean, segment and tokenize a corpus with Ray Data")
    _add_config_args(prep)
    _add_address_arg(prep)
    prep.add_argument("--no-ray", action="store_true",
                      help="prepare in this one process (the same output), without Ray")
    prep.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; a `RaydiffError` prints one line and returns 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes no positionals after an option once a positional list has started
    # (`train --no-ray key=value`, `cluster check FILE --config C key=value`): hand such
    # overrides to that list
    if extra and all("=" in e and not e.startswith("-") for e in extra):
        if hasattr(args, "targets"):
            args.targets += extra
        elif hasattr(args, "overrides"):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console = Console(stderr=True)
    try:
        with warnings_as_lines(console):
            return args.func(args, console)
    except RaydiffError as e:  # what the user can fix: one line; anything else is a bug
        kind = {ConfigError: "config error", ClusterError: "cluster error"}.get(type(e), "error")
        console.print(f"[red]{kind}:[/red] {e}", soft_wrap=True)
    except KeyboardInterrupt:
        # at once, without the interpreter's teardown: a Ray interrupted half-way through
        # start-up crashes in it (exit 139); Ray's own processes share this one's fate
        console.print("interrupted")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return 2


if __name__ == "__main__":
    sys.exit(main())
