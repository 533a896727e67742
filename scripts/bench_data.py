#!/usr/bin/env python
"""Preparation throughput, printed as JSON: `raydiff prepare` (Ray Data) on 1 and 2 CPUs against
a single-process baseline running the same stages (cleaning, segmentation, splitting into
words, de-duplication, vocabulary, ids, Parquet writing) without Ray. Ray's start-up is
reported apart; every measurement is repeated and the median reported.

    python scripts/bench_data.py [--source ../shared/data/reuters21578/reuters21578.jsonl.gz]
                                 [--cpus 1 2] [--max-articles N] [--repeat 3]

Each Ray measurement runs in a fresh subprocess with `ray.init(num_cpus=k)`; starting Ray and
a first tiny Ray Data job (which starts Ray Data's stats actor and the worker processes, and
imports the pipeline there) is timed as start-up, apart from prepare.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "reuters21578" / "reuters21578.jsonl.gz"


def _overrides(source: str, out_dir: str, max_articles: int | None) -> list[str]:
    out = [f"data.source={source}", f"data.out_dir={out_dir}"]
    return out + ([f"data.max_articles={max_articles}"] if max_articles else [])


def input_megabytes(source: str) -> float:
    opener = gzip.open if source.endswith(".gz") else open
    with opener(source, "rb") as f:
        return sum(len(line) for line in f) / 1e6


def baseline(source: str, max_articles: int | None) -> dict:
    """The same stages in one process and one thread, no Ray: the file's lines through
    `SegmentRecords` as one batch, then `assemble` and `write_output` (the tokenizer library
    would otherwise use every core, which a 1-CPU Ray task does not)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from raydiff.config import load_config
    from raydiff.data.assemble import assemble
    from raydiff.data.pipeline import SegmentRecords, explode_files, kept_records, write_output
    from raydiff.data.storage import Location

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, _overrides(source, out, max_articles)).data
        start = time.perf_counter()
        lines = explode_files({"path": [source], "bytes": [Path(source).read_bytes()]})
        records = SegmentRecords(cfg, file_index={source: 0})(lines).sort_by("order")
        kept = kept_records(records, cfg)
        assembled = assemble(kept, cfg.vocab_size, cfg.seq_len, cfg.lowercase)
        per_split = write_output(Location.of(out, cfg), assembled)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "articles": kept.num_rows,
            "segments": sum(s["segments"] for s in per_split.values())}


def baseline_run(source: str, max_articles: int | None) -> dict:
    """`baseline` in a fresh interpreter, like each Ray run (imports paid every time)."""
    command = [sys.executable, __file__, "--source", source, "--baseline-only"]
    command += ["--max-articles", str(max_articles)] if max_articles else []
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def ray_run(source: str, cpus: int, max_articles: int | None) -> dict:
    """One `prepare` on a fresh local Ray with `cpus` CPUs, in a subprocess."""
    code = f"""
import json, tempfile, time, ray, ray.data
from ray.data import DataContext
from raydiff.config import load_config
from raydiff.data.pipeline import prepare
t0 = time.perf_counter()
ray.init(address="local", num_cpus={cpus}, include_dashboard=False, log_to_driver=False)
DataContext.get_current().enable_progress_bars = False

def warm(batch):  # Ray Data's first job starts its stats actor and workers; pay that here
    import raydiff.data.pipeline  # noqa: F401
    time.sleep(0.2)
    return batch

ray.data.range(4 * {cpus}, override_num_blocks=4 * {cpus}).map_batches(warm).materialize()
startup = time.perf_counter() - t0
with tempfile.TemporaryDirectory() as out:
    cfg = load_config(None, {_overrides(source, "OUT", max_articles)!r}).data
    cfg.out_dir = out
    t1 = time.perf_counter()
    m = prepare(cfg).manifest
    seconds = time.perf_counter() - t1
print("RESULT" + json.dumps({{"ray_startup_s": startup, "seconds": seconds,
                             "articles": m["articles"], "segments": m["segments"],
                             "timings": m["timings"]}}))
ray.shutdown()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"ray run with {cpus} CPUs failed:\n{proc.stderr[-3000:]}")


def _median_run(runs: list[dict], mb: float) -> dict:
    """The run with the median time, its throughput, and every run's seconds (the shared host's
    noise is tens of percent from run to run)."""
    median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return median | {"mb_per_s": mb / median["seconds"],
                     "segments_per_s": median["segments"] / median["seconds"],
                     "all_seconds": [round(r["seconds"], 2) for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-articles", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement, the median reported (default 3)")
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not Path(args.source).exists():
        sys.exit(f"error: {args.source}: no such file (the benchmark reads ../shared/data)")
    if args.baseline_only:
        print(json.dumps(baseline(args.source, args.max_articles)))
        return

    mb = input_megabytes(args.source)
    results = {"source": args.source, "input_mb_uncompressed": mb,
               "max_articles": args.max_articles, "repeat": args.repeat}
    # interleaved, so that a slow spell on the host does not fall on one measurement only
    runs: dict[str, list[dict]] = {"baseline": []} | {f"ray_{c}cpu": [] for c in args.cpus}
    for _ in range(args.repeat):
        runs["baseline"].append(baseline_run(args.source, args.max_articles))
        for cpus in args.cpus:
            runs[f"ray_{cpus}cpu"].append(ray_run(args.source, cpus, args.max_articles))
    for name, measured in runs.items():
        results[name] = _median_run(measured, mb)
    if "ray_1cpu" in results and "ray_2cpu" in results:
        results["speedup_2cpu_over_1cpu"] = (results["ray_1cpu"]["seconds"]
                                             / results["ray_2cpu"]["seconds"])
    if "ray_1cpu" in results:
        results["ray_1cpu_over_baseline_time"] = (results["ray_1cpu"]["seconds"]
                                                  / results["baseline"]["seconds"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
