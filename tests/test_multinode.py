"""Preparation across nodes: a `ray.cluster_utils.Cluster` with two worker nodes; every stage of
`prepare` runs on both and the output is one process's. (Training across nodes:
tests/test_elastic.py and tests/test_jobs.py.)"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.ray  # clusters of their own, in other processes


def _corpus(directory, files=8, articles=400):
    """Synthetic news with a realistic number of distinct words (so that the word-count
    shuffle, too, has tasks for both nodes)."""
    import gzip
    import random

    from raydiff.data.synthetic import synthetic_news

    directory.mkdir()
    rng = random.Random(0)
    news = synthetic_news(files * articles, seed=3)
    for f in range(files):
        rows = news[f * articles:(f + 1) * articles]
        body = "".join(json.dumps({"id": a["id"], "text": a["text"] + "\n" + " ".join(
            f"w{rng.randrange(40_000)}" for _ in range(30))}) + "\n" for a in rows)
        (directory / f"part-{f}.jsonl.gz").write_bytes(gzip.compress(body.encode()))


@pytest.mark.timeout(420)
def test_every_stage_of_prepare_runs_on_both_worker_nodes_and_matches_one_process(tmp_path):
    from pathlib import Path

    import numpy as np

    from raydiff.config import load_config
    from raydiff.data.local import prepare_local
    from raydiff.data.prepared import read_split_blocks

    _corpus(tmp_path / "src")
    overrides = ["data.shard_rows=500", "data.vocab_size=300", "data.valid_fraction=0.2"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="rdp", dir="/tmp"), PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.multinode_prepare", str(tmp_path / "src"),
         str(tmp_path / "cluster"), *overrides], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    workers = set(result["worker_nodes"])

    def nodes_of(stage: str) -> set:
        return set().union(*[set(ids) for name, ids in result["ran_on"].items() if stage in name])

    for stage in ["ReadCorpusFiles", "MapBatches(SegmentStage)",
                  "HashAggregateReduce(key_columns=('kind'", "MapBatches(WordStage)",
                  "MapBatches(word_counts)", "HashAggregateReduce(key_columns=('word'",
                  "MapBatches(TopWords)", "MapBatches(EncodeStage)", "Write"]:
        assert nodes_of(stage) == workers, (stage, nodes_of(stage))
    # Ray places a shuffle-map task on the node that holds its input (soft affinity), so on a
    # corpus this small the word counts' few map tasks may all land on one node; each shuffle
    # as a whole (map and reduce) runs on both, and nothing ever runs on the CPU-less head
    for key in ("kind", "word"):
        maps = nodes_of(f"HashAggregateMap(key_columns=('{key}'")
        assert maps and maps <= workers
        assert maps | nodes_of(f"HashAggregateReduce(key_columns=('{key}'") == workers

    # the same output as one process
    local = prepare_local(load_config(None, [f"data.source={tmp_path / 'src'}",
                                             f"data.out_dir={tmp_path / 'local'}",
                                             *overrides]).data)
    cluster = Path(result["path"])
    assert cluster.name == Path(local.path).name
    assert (cluster / "tokenizer" / "tokenizer.json").read_text() == \
        (Path(local.path) / "tokenizer" / "tokenizer.json").read_text()
    for split in ("train", "valid", "test"):
        a, b = read_split_blocks(str(cluster), split), read_split_blocks(local.path, split)
        assert all(np.array_equal(a[k], b[k]) for k in a)
