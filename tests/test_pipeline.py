"""The Ray Data preparation pipeline on real files: counts, dedup, splits, manifest, caching."""

import gzip
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from raydiff.config import load_config
from raydiff.data.output import MANIFEST
from raydiff.data.pipeline import prepare
from raydiff.data.prepared import read_split_blocks
from raydiff.data.records import split_of
from raydiff.data.sources import output_location
from tests.conftest import SHARED_DATA


def _write_corpus(path, n=120):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(n):
            body = f"Shares of Acme rose {i} pct in trading.\nThe company said demand was strong."
            f.write(json.dumps({"id": f"a{i}", "text": body}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"id": "empty", "text": "   "}) + "\n")
        f.write(json.dumps({"id": "notext", "title": "x"}) + "\n")
    with open(path, "ab") as f:  # an uncompressed tail would corrupt gzip: use a second member
        f.write(gzip.compress(b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}\n'))


@pytest.mark.timeout(240)
def test_prepare_jsonl_gz_end_to_end(ray_session, tmp_path):
    src = tmp_path / "corpus.jsonl.gz"
    _write_corpus(src)
    cfg = load_config(None, [f"data.source={src}", f"data.out_dir={tmp_path / 'out'}",
                             "data.seq_len=12", "data.vocab_size=50",
                             "data.valid_fraction=0.2", "data.test_fraction=0.1"]).data
    first = prepare(cfg)
    m = first.manifest
    assert not first.reused and (tmp_path / 'out' / first.location.uri.rsplit('/', 1)[1] / MANIFEST).exists()
    assert m["articles"] == 120
    assert m["skipped"] == {"malformed_json": 1, "invalid_utf8": 1, "empty_text": 2,
                            "too_long": 0, "empty_file": 0, "corrupt_file": 0}
    # "the company said demand was strong." occurs in every article: kept once after dedup
    assert m["segments_before_dedup"] == 240 and m["segments"] == 121
    assert sum(s["segments"] for s in m["splits"].values()) == m["segments"]
    expected_splits = {split_of(f"a{i}", 0.2, 0.1) for i in range(120)}
    assert {s for s, v in m["splits"].items() if v["segments"]} == expected_splits

    tok = AutoTokenizer.from_pretrained(first.path + "/tokenizer")
    assert len(tok) <= 50
    train = read_split_blocks(first.path, "train")
    assert train["input_ids"].shape[1] == 12
    assert 0 < m["pad_fraction"] < 1 and 0 <= m["oov_rate"] < 0.5
    assert np.all(train["input_ids"][train["attention_mask"] == 0] == 0)

    again = prepare(cfg)  # same sources and config: nothing is redone
    assert again.reused and again.path == first.path and again.manifest == m
    other = load_config(None, [f"data.source={src}", f"data.out_dir={tmp_path / 'out'}",
                               "data.seq_len=16"]).data
    assert output_location(other).uri != first.path


@pytest.mark.timeout(300)
@pytest.mark.skipif(not (SHARED_DATA / "reuters21578").exists(), reason="../shared/data absent")
def test_real_reuters_slice_has_sane_statistics(ray_session, tmp_path):
    cfg = load_config(None, [
        f"data.source={SHARED_DATA / 'reuters21578' / 'reuters21578.jsonl.gz'}",
        f"data.out_dir={tmp_path}", "data.max_articles=1500", "data.vocab_size=5000"]).data
    m = prepare(cfg).manifest
    assert m["articles"] == 1500
    assert 3_000 < m["segments"] < 30_000
    assert 0.005 < m["oov_rate"] < 0.15  # held-out words outside a 5k vocabulary
    assert 0.2 < m["pad_fraction"] < 0.8  # news sentences average well under 32 words
    assert m["splits"]["train"]["segments"] > 5 * m["splits"]["valid"]["segments"] > 0
    mean_len = m["tokens"] / m["segments"]
    assert 8 < mean_len < 32


@pytest.mark.parametrize("rows, cpus, most", [(168_231, 2, 500_000), (168_231, 4, 50_000),
                                              (10_186_606, 2, 84_000), (10_186_606, 8, 10**7)])
def test_tasks_come_in_multiples_of_the_cpus_and_stay_under_the_bound(rows, cpus, most):
    from raydiff.data.pipeline import _per_task

    per_task = _per_task(rows, cpus, most)
    tasks = -(-rows // per_task)  # what bundling the rows into tasks of per_task gives
    assert per_task <= most and tasks % cpus == 0  # no CPU left with a last task alone
    assert tasks == cpus or per_task > most // 2  # no more tasks than the bound needs
