#!/usr/bin/env python
"""Preparation throughput, printed as JSON: `raydiff prepare` (Ray Data) on 1 and 2 CPUs against
a single-process baseline doing the same cleaning, segmentation, de-duplication, tokenizer
training, tokenization and Parquet writing without Ray. Ray's start-up is reported apart.

    python scripts/bench_data.py [--source ../shared/data/reuters21578/reuters21578.jsonl.gz]
                                 [--cpus 1 2] [--max-articles N]

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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
    """The same work in one process and one thread, no Ray (the tokenizer library would
    otherwise use every core, which a 1-CPU Ray task does not)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from raydiff.config import load_config
    from raydiff.data.blocks import encode_fixed
    from raydiff.data.corpus import SPLITS, article_from_row, article_segments, split_of
    from raydiff.data.tokenizer import train_word_tokenizer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, _overrides(source, out, max_articles)).data
        start = time.perf_counter()
        rank_of = {"valid": 0, "test": 1, "train": 2}
        best: dict[str, int] = {}
        n_articles = 0
        with gzip.open(source, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if max_articles and n_articles >= max_articles:
                    break
                try:
                    article = article_from_row(json.loads(line), cfg, str(i))
                except json.JSONDecodeError:
                    continue
                if article is None:
                    continue
                n_articles += 1
                rank = rank_of[split_of(article["id"], cfg.valid_fraction, cfg.test_fraction)]
                for seg in article_segments(article["text"], cfg):
                    best[seg] = min(rank, best.get(seg, 3))
        segments = list(best)
        split_of_rank = np.array([SPLITS.index("valid"), SPLITS.index("test"),
                                  SPLITS.index("train")])
        splits = split_of_rank[np.array([best[s] for s in segments])]
        tokenizer = train_word_tokenizer((s for s, r in best.items() if r == 2), cfg.vocab_size)
        ids, mask = encode_fixed(tokenizer.backend_tokenizer, segments, cfg.seq_len)
        for index, split in enumerate(SPLITS):
            keep = splits == index
            Path(out, split).mkdir()
            pq.write_table(pa.table({"input_ids": list(ids[keep]),
                                     "attention_mask": list(mask[keep])}),
                           Path(out, split, "part-0.parquet"))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "articles": n_articles, "segments": len(segments)}


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
                             "articles": m["articles"], "segments": m["segments"]}}))
ray.shutdown()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"ray run with {cpus} CPUs failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-articles", type=int, default=None)
    args = parser.parse_args()
    if not Path(args.source).exists():
        sys.exit(f"error: {args.source}: no such file (the benchmark reads ../shared/data)")

    mb = input_megabytes(args.source)
    results = {"source": args.source, "input_mb_uncompressed": mb,
               "max_articles": args.max_articles}
    base = baseline(args.source, args.max_articles)
    results["baseline"] = base | {"mb_per_s": mb / base["seconds"],
                                  "segments_per_s": base["segments"] / base["seconds"]}
    for cpus in args.cpus:
        r = ray_run(args.source, cpus, args.max_articles)
        results[f"ray_{cpus}cpu"] = r | {"mb_per_s": mb / r["seconds"],
                                         "segments_per_s": r["segments"] / r["seconds"]}
    if "ray_1cpu" in results and "ray_2cpu" in results:
        results["speedup_2cpu_over_1cpu"] = (results["ray_1cpu"]["seconds"]
                                             / results["ray_2cpu"]["seconds"])
    if "ray_1cpu" in results:
        results["ray_1cpu_over_baseline_time"] = results["ray_1cpu"]["seconds"] / base["seconds"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
