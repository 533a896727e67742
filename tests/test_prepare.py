"""`prepare` on Ray Data against what it must equal: the previous implementation on the real
corpora, a plain-Python de-duplication, the tokenizer library's trainer, and the in-process
executor (`--no-ray`); damaged files counted, hub files streamed."""

import bz2
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydiff.config import load_config
from raydiff.data.local import prepare_local
from raydiff.data.pipeline import prepare
from raydiff.data.prepared import read_split_blocks
from raydiff.data.records import RANK_OF_SPLIT, SPLITS, split_of
from raydiff.data.tokenizer import save_word_tokenizer, train_word_tokenizer
from tests import reference
from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.timeout(300)]


def _cfg(tmp_path, source, *extra):
    return load_config(None, [f"data.source={source}", f"data.out_dir={tmp_path / 'out'}",
                              *extra]).data


def _rows(blocks: dict) -> list[bytes]:
    """A split's blocks as a sorted list (a multiset of rows)."""
    both = np.concatenate([blocks["input_ids"].astype(np.int32),
                           blocks["attention_mask"].astype(np.int32)], axis=1)
    return sorted(map(bytes, both))


def _tokenizer_file(path) -> str:
    return (path / "tokenizer" / "tokenizer.json").read_text()


def _write_jsonl(path, rows, compress=True):
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if compress else text)


@pytest.mark.skipif(not (SHARED_DATA / "reuters21578").exists(), reason="../shared/data absent")
@pytest.mark.parametrize("corpus", ["reuters21578/reuters21578.jsonl.gz",
                                    "cc_news/cc_news.jsonl.gz"])
def test_same_tokenizer_and_blocks_as_the_previous_implementation(ray_session, tmp_path, corpus):
    cfg = _cfg(tmp_path, SHARED_DATA / corpus)
    prepared = prepare(cfg)
    tokenizer, splits = reference.reference_prepare(SHARED_DATA / corpus, cfg)
    save_word_tokenizer(tokenizer, tmp_path / "ref")
    out = prepared.location.uri
    assert _tokenizer_file(Path(out)) == (tmp_path / "ref" / "tokenizer.json").read_text()
    for split in SPLITS:
        assert _rows(read_split_blocks(out, split)) == _rows(splits[split]), split

    # the in-process executor: the same directory name, byte-identical tokenizer, and the same
    # arrays in the same (row_id) order
    local = prepare_local(_cfg(tmp_path / "local", SHARED_DATA / corpus))
    assert Path(local.path).name == Path(out).name
    assert _tokenizer_file(Path(local.path)) == _tokenizer_file(Path(out))
    for split in SPLITS:
        ours, theirs = read_split_blocks(out, split), read_split_blocks(local.path, split)
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    counts = {k: prepared.manifest[k] for k in ("articles", "lines", "segments", "tokens",
                                                  "segments_before_dedup", "skipped")}
    assert counts == {k: local.manifest[k] for k in counts}


def _dedup_corpus(tmp_path, n_files=6, per_file=60, shared=200, seed=0):
    """Articles over several files, many sharing sentences with articles of other files and
    other splits; returns (directory, the plain-Python expectation {segment: split rank}, the
    number of segments before de-duplication)."""
    rng = random.Random(seed)
    common = [f"Shared sentence number {i} about {rng.choice(['oil', 'grain', 'banks'])}"
              for i in range(shared)]
    src = tmp_path / "src"
    src.mkdir()
    best, total = {}, 0
    for f in range(n_files):
        rows = []
        for a in range(per_file):
            lines = [f"Unique line {f} {a} {k} of this article" for k in range(rng.randint(1, 3))]
            lines += rng.sample(common, rng.randint(1, 4))
            rng.shuffle(lines)
            article_id = f"f{f}-a{a}"
            rank = RANK_OF_SPLIT[split_of(article_id, 0.2, 0.2)]
            for line in lines:
                segment = line.lower()
                best[segment] = min(rank, best.get(segment, 3))
                total += 1
            rows.append({"id": article_id, "text": "\n".join(lines)})
        _write_jsonl(src / f"part-{f}.jsonl.gz", rows)
    return src, best, total


def test_duplicates_across_files_partitions_and_splits_are_kept_once_most_held_out(
        ray_session, tmp_path):
    src, best, total = _dedup_corpus(tmp_path)
    cfg = _cfg(tmp_path, src, "data.valid_fraction=0.2", "data.test_fraction=0.2",
               "data.vocab_size=500", "data.seq_len=12")
    prepared = prepare(cfg)
    m = prepared.manifest
    assert m["segments_before_dedup"] == total and m["segments"] == len(best) < total
    expected = {split: sorted(s for s, r in best.items() if r == RANK_OF_SPLIT[split])
                for split in SPLITS}
    assert {s: m["splits"][s]["segments"] for s in SPLITS} == \
        {s: len(v) for s, v in expected.items()}
    from raydiff.data.blocks import encode_fixed
    from raydiff.data.prepared import prepared_tokenizer

    tok = prepared_tokenizer(prepared.location).backend_tokenizer
    for split in SPLITS:  # every split holds exactly its segments' encodings
        ids, mask = encode_fixed(tok, expected[split], cfg.seq_len)
        assert _rows(read_split_blocks(prepared.path, split)) == \
            _rows({"input_ids": ids, "attention_mask": mask})
    row_ids = np.concatenate([pq.read_table(f"{prepared.path}/{s}/{name}")["row_id"].to_numpy()
                              for s in SPLITS for name in m["splits"][s]["shards"]])
    assert len(np.unique(row_ids)) == len(row_ids) == len(best)


def test_vocabulary_ties_at_the_cut_are_broken_as_the_trainer_does(ray_session, tmp_path):
    # 30 frequent words, then 300 words of equal count: the cut falls inside the tie, whose
    # words hash to every partition of the counting shuffle
    rng = random.Random(1)
    frequent = [f"common{i}" for i in range(30)]
    tied = [f"tie{i:03d}x" for i in range(300)]
    rows, words = [], [w for w in tied for _ in range(4)]
    rng.shuffle(words)
    for a in range(0, len(words), 6):
        rows.append({"id": f"a{a}", "text": " ".join(frequent[: 12] + words[a:a + 6]) + " ."})
    src = tmp_path / "ties.jsonl"
    _write_jsonl(src, rows, compress=False)
    cfg = _cfg(tmp_path, src, "data.valid_fraction=0", "data.test_fraction=0",
               "data.vocab_size=150", "data.min_words=1", "data.max_words=100")
    prepared = prepare(cfg)
    train = [reference.article_segments(r["text"], cfg) for r in rows]
    trained = train_word_tokenizer(list(dict.fromkeys(s for ss in train for s in ss)), 150)
    ours = json.loads(_tokenizer_file(Path(prepared.path)))
    theirs = json.loads(trained.backend_tokenizer.to_str())
    # everything (vocabulary and ids, normalizer, pre-tokenizer, specials) but the no-op
    # post-processor that transformers' wrapper adds
    assert {k: v for k, v in ours.items() if k != "post_processor"} == \
        {k: v for k, v in theirs.items() if k != "post_processor"}
    assert prepared.manifest["vocab_size"] == 150
    tied_in = [w for w in ours["model"]["vocab"] if w.startswith("tie")]
    assert 0 < len(tied_in) < len(tied)  # the cut fell inside the tie


def test_damaged_files_are_counted_named_and_the_rest_is_prepared(ray_session, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = [{"id": f"g{i}", "text": f"Good article {i} with enough words."} for i in range(40)]
    _write_jsonl(src / "good.jsonl.gz", good)
    whole = gzip.compress("".join(json.dumps({"id": f"t{i}", "text": f"lost article {i} here"})
                                  + "\n" for i in range(40)).encode())
    (src / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    garbled = bytearray(whole)
    garbled[30:60] = bytes(30)
    (src / "garbled.jsonl.gz").write_bytes(bytes(garbled))
    (src / "bad.jsonl.bz2").write_bytes(bz2.compress(b'{"id": 1}\n' * 50)[:40] + b"x" * 40)
    (src / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    m = prepare(_cfg(tmp_path, src, "data.valid_fraction=0", "data.test_fraction=0")).manifest
    assert m["articles"] == 40
    assert m["skipped"]["corrupt_file"] == 4
    assert [d["path"].rsplit("/", 1)[1] for d in m["skipped_files"]] == \
        ["bad.jsonl.bz2", "bad.parquet", "garbled.jsonl.gz", "truncated.jsonl.gz"]
    assert all(d["reason"] and "\n" not in d["reason"] for d in m["skipped_files"])


def test_ray_and_in_process_preparation_agree_including_max_articles(ray_session, tmp_path):
    for extra in ([], ["data.max_articles=150", "data.pack=true"]):
        cfg = _cfg(tmp_path / "ray", "synthetic", "data.synthetic_size=400", *extra)
        ours, theirs = prepare(cfg), prepare_local(_cfg(tmp_path / "local", "synthetic",
                                                        "data.synthetic_size=400", *extra))
        assert ours.manifest["articles"] == theirs.manifest["articles"] == \
            (150 if extra else 400)
        assert _tokenizer_file(Path(ours.path)) == _tokenizer_file(Path(theirs.path))
        for split in SPLITS:
            a, b = read_split_blocks(ours.path, split), read_split_blocks(theirs.path, split)
            assert all(np.array_equal(a[k], b[k]) for k in a)


def test_hub_files_stream_without_loading_the_dataset(ray_session, tmp_path, monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("the whole dataset was loaded into the driver")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    rows = [{"title": f"Report {i}", "text": f"Acme shares rose {i} pct on monday."}
            for i in range(120)]  # no id column: ids are "<name>:<row>" across the files
    for k in range(2):
        datasets.Dataset.from_list(rows[60 * k:60 * (k + 1)]).to_parquet(
            str(tmp_path / f"train-{k}.parquet"))
    cfg = _cfg(tmp_path, "parquet", f"data.hub_data_files={tmp_path}/train-*.parquet",
               "data.valid_fraction=0.3", "data.test_fraction=0.3")
    m = prepare(cfg).manifest
    assert m["articles"] == 120
    expected = [split_of(f"parquet:{row}", 0.3, 0.3) for row in range(120)]
    assert {s: m["splits"][s]["segments"] for s in SPLITS} == \
        {s: expected.count(s) for s in SPLITS}
    # the same files read in process give the same output
    local = prepare_local(_cfg(tmp_path / "local", "parquet",
                               f"data.hub_data_files={tmp_path}/train-*.parquet",
                               "data.valid_fraction=0.3", "data.test_fraction=0.3")).manifest
    assert local["splits"] == {s: dict(v, shards=local["splits"][s]["shards"])
                               for s, v in m["splits"].items()}


def test_a_no_ray_run_uses_the_data_and_tokenizer_a_ray_run_prepared(ray_session, smoke_cfg):
    from raydiff.config import apply_overrides
    from raydiff.data.prepared import prepared_tokenizer
    from raydiff.data.tokenizer import load_tokenizer
    from raydiff.eval.loading import same_vocabulary
    from raydiff.train.local import train_local

    cfg = apply_overrides(smoke_cfg, {"train.max_steps": 2, "train.log_every": 1,
                                      "train.eval_every": 2, "train.checkpoint_every": 2})
    on_ray = prepare(cfg.data)  # what `raydiff train` on Ray does first
    run = train_local(cfg)  # `raydiff train --no-ray` (and train-reference --no-ray)
    assert [p.name for p in Path(cfg.data.out_dir).iterdir() if not p.name.startswith(".")] == \
        [Path(on_ray.path).name]  # found the Ray run's output and reused it
    assert same_vocabulary(load_tokenizer(run.last_checkpoint / "tokenizer"),
                           prepared_tokenizer(on_ray.location))
