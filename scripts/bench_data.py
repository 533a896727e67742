#!/usr/bin/env python
"""`prepare` at corpus scale, printed as JSON: the real shared corpora (Reuters-21578, CC-News,
AllSides) copied K times, every copy made distinct, prepared on a local Ray of `--cpus` CPUs.

    python scripts/bench_data.py --scale 1 4 10 60 [--cpus 2] [--object-store-mb 200]
                                 [--baseline] [--cold] [--repeat R]

Per size: input MB (uncompressed JSON Lines), wall and work seconds (the manifest's timings:
Ray's start-up and a warm-up `prepare` of a generated corpus file, which starts the worker
processes of every pool the pipeline uses and touches the object store's memory, are apart),
MB/s per core, the driver's peak RSS (`resource.getrusage` in the driver process), the Ray
worker processes' memory (sampled every 0.2 s: the largest RSS of one worker, and the largest
sum of their PSS), what Ray spilled to disk, segments written. `--baseline` adds the same stages
in one process without Ray (`raydiff.data.local`), `--cold` the end-to-end `raydiff prepare`
command in a fresh process, `--repeat R` R - 1 more runs of the same prepare in the same Ray
(`repeat_work_s`, and MB/s per core from their median).

Copy k of an article has the id `<id>#c<k>` and the word `q<k>` before every point where the
segmenter may cut and at the end of every line, so that no segment of one copy equals one of
another: de-duplication keeps every copy, and still removes what repeats within one. Copy 0 is
the corpora unchanged. Copies are written once to `--work-dir` and reused.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CORPORA = ("reuters21578/reuters21578.jsonl.gz", "cc_news/cc_news.jsonl.gz",
           "allsides_news/allsides_news.jsonl.gz")
CUT = re.compile(r"([.!?])(\s+)(?=[\"'(\[]?[A-Z0-9])")  # where clean.SENTENCE_END may cut


def _copy(args: tuple[int, str]) -> tuple[str, int]:
    """Write copy k of the corpora; (path, uncompressed bytes)."""
    k, directory = args
    path = Path(directory) / f"copy-{k:03d}.jsonl.gz"
    size = 0
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=1) as out:
        for name in CORPORA:
            with gzip.open(SHARED / name, "rb") as f:
                for raw in f:
                    if k:
                        row = json.loads(raw)
                        row["id"] = f"{row.get('id')}#c{k}"
                        mark = f" q{k}"
                        row["text"] = "\n".join(
                            CUT.sub(rf"{mark}\1\2", line) + mark if line.strip() else line
                            for line in row["text"].split("\n"))
                        raw = (json.dumps(row) + "\n").encode()
                    out.write(raw)
                    size += len(raw)
    tmp.replace(path)
    return str(path), size


def build_corpus(scale: int, work_dir: Path) -> tuple[Path, float]:
    """A directory with copies 0..scale-1 (links to the shared copies); its input MB."""
    copies = work_dir / "copies"
    copies.mkdir(parents=True, exist_ok=True)
    sizes_file = copies / "sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
    missing = [k for k in range(scale) if str(k) not in sizes
               or not (copies / f"copy-{k:03d}.jsonl.gz").exists()]
    if missing:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            for k, (_, size) in zip(missing, pool.map(_copy, [(k, str(copies)) for k in missing]),
                                    strict=True):
                sizes[str(k)] = size
        sizes_file.write_text(json.dumps(sizes))
    corpus = work_dir / f"x{scale}"
    corpus.mkdir(exist_ok=True)
    for k in range(scale):
        link = corpus / f"copy-{k:03d}.jsonl.gz"
        if not link.exists():
            link.symlink_to(copies / link.name)
    return corpus, sum(sizes[str(k)] for k in range(scale)) / 1e6


RAY_RUN = r"""
import json, os, resource, sys, tempfile, threading, time
import ray, ray.data
from ray.data import DataContext
from raydiff.config import load_config
from raydiff.runtime import start_ray

source, cpus, store_mb, repeat, warmup = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                          int(sys.argv[4]), sys.argv[5])
t0 = time.perf_counter()
start_ray("local", num_cpus=cpus, include_dashboard=False,
          object_store_memory=store_mb * 2**20 if store_mb else None)
DataContext.get_current().enable_progress_bars = False
from raydiff.data.pipeline import prepare
# a warm-up: `prepare` of a generated corpus (`warmup_corpus`), through every stage and pool of
# the real one: it starts Ray Data's actors and the worker processes of each pool, imports
# raydiff and builds its character tables there, and touches the object store's memory (after a
# warm-up of 4,000 articles, the first K=1 prepare still took ~0.4 s more than the next ones)
with tempfile.TemporaryDirectory() as out:
    prepare(load_config(None, [f"data.source={warmup}", f"data.out_dir={out}"]).data)
startup = time.perf_counter() - t0

peak = {"max_worker": 0, "sum_workers": 0}
stop = threading.Event()
# (RSS, PSS) in bytes of each of Ray's worker processes ("ray::..." or default_worker.py;
# Linux). PSS divides the object store's pages, which every worker reading a block maps,
# among the processes mapping them: their sum does not count those pages over and over.
def worker_memory():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
            if int(pid) != os.getpid() and (cmd.startswith(b"ray::") or b"default_worker.py" in cmd):
                rollup = open(f"/proc/{pid}/smaps_rollup").read()
                kib = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]}
                found.append((kib["Rss"] * 1024, kib["Pss"] * 1024))
        except (OSError, IndexError, ValueError, KeyError):
            pass
    return found
def sample():
    while not stop.wait(0.2):
        found = worker_memory()
        if found:
            peak["max_worker"] = max(peak["max_worker"], max(r for r, _ in found))
            peak["sum_workers"] = max(peak["sum_workers"], sum(p for _, p in found))
threading.Thread(target=sample, daemon=True).start()

again = []  # the work seconds of each repeat: the same prepare in the same, now warm, Ray
for i in range(repeat):
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [f"data.source={source}", f"data.out_dir={out}"]).data
        t1 = time.perf_counter()
        run = prepare(cfg).manifest
        if i == 0:
            m, wall = run, time.perf_counter() - t1
        else:
            again.append(sum(run["timings"].values()))
stop.set()
summary = ray._private.internal_api.memory_summary(stats_only=True)
spilled = [line for line in summary.splitlines() if "Spilled" in line]
print("RESULT" + json.dumps({
    "ray_startup_s": startup, "wall_s": wall, "work_s": sum(m["timings"].values()),
    "timings": m["timings"], "repeat_work_s": again,
    "segments": m["segments"], "articles": m["articles"],
    "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_peak_rss_mb": peak["max_worker"] / 2**20,
    "workers_peak_pss_sum_mb": peak["sum_workers"] / 2**20,
    "spilled": spilled[0].strip() if spilled else "none"}))
ray.shutdown()
"""

BASELINE_RUN = r"""
import json, os, resource, sys, tempfile, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, as a Ray task has
from raydiff.config import load_config
from raydiff.data.local import prepare_local
with tempfile.TemporaryDirectory() as out:
    cfg = load_config(None, [f"data.source={sys.argv[1]}", f"data.out_dir={out}"]).data
    t = time.perf_counter()
    m = prepare_local(cfg).manifest
    wall = time.perf_counter() - t
print("RESULT" + json.dumps({"wall_s": wall, "work_s": sum(m["timings"].values()),
                             "segments": m["segments"],
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                             / 1024}))
"""


def warmup_corpus(work_dir: Path) -> Path:
    """A generated corpus for the warm-up, as a file (100,000 short articles, ~30 MB of JSON
    Lines): read by the workers like the real ones, so that it leaves nothing in the driver."""
    from raydiff.data.synthetic import synthetic_news

    path = work_dir / "warmup" / "warmup.jsonl.gz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with gzip.open(tmp, "wt", compresslevel=1) as out:
            out.writelines(json.dumps(a) + "\n" for a in synthetic_news(100_000, seed=1))
        tmp.replace(path)
    return path.parent


def _run(code: str, *args: str) -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"run failed:\n{proc.stderr[-3000:]}")


def cold_cli(source: str, cpus: int) -> dict:
    """`raydiff prepare` as a user runs it: a fresh process, Ray started inside."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "raydiff.cli", "prepare", f"data.source={source}",
             f"data.out_dir={out}"], capture_output=True, text=True, cwd=ROOT, timeout=3600,
            env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled"))
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        return {"wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, nargs="+", default=[1, 4, 10])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--object-store-mb", type=int, default=0, help="0: Ray's default")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="prepare this many times in one Ray; the repeats' work apart")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "raydiff-bench"))
    args = parser.parse_args()
    if not (SHARED / CORPORA[0]).exists():
        sys.exit(f"error: {SHARED}: the shared corpora are missing")
    results = []
    for scale in args.scale:
        corpus, mb = build_corpus(scale, Path(args.work_dir))
        row = {"scale": scale, "input_mb": round(mb, 1), "cpus": args.cpus,
               "object_store_mb": args.object_store_mb or "default"}
        ray = _run(RAY_RUN, str(corpus), str(args.cpus), str(args.object_store_mb),
                   str(args.repeat), str(warmup_corpus(Path(args.work_dir))))
        row |= ray | {"mb_per_s_per_core": mb / ray["work_s"] / args.cpus}
        if ray["repeat_work_s"]:
            row["repeat_mb_per_s_per_core"] = mb / statistics.median(ray["repeat_work_s"]) / args.cpus
        if args.baseline:
            base = _run(BASELINE_RUN, str(corpus))
            row["baseline_one_process"] = base | {"mb_per_s": mb / base["work_s"]}
        if args.cold:
            row["cold_cli"] = cold_cli(str(corpus), args.cpus)
        print(json.dumps(row), flush=True)
        results.append(row)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
