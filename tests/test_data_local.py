"""Splits, tokenizer files, fixed blocks, reading sources and preparing in one process."""

import gzip
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from raydiff.config import load_config
from raydiff.data.batches import chunk_batches, iterate_batches
from raydiff.data.blocks import encode_blocks
from raydiff.data.local import prepare_local, read_segments
from raydiff.data.prepared import prepared_tokenizer, read_split_blocks
from raydiff.data.records import split_of
from raydiff.data.storage import DataError
from raydiff.data.synthetic import synthetic_news
from raydiff.data.tokenizer import PAD_ID, UNK_ID, save_tokenizer, train_word_tokenizer


def test_split_by_article_is_deterministic_disjoint_and_proportional():
    ids = [f"article-{i}" for i in range(20000)]
    first = [split_of(a, 0.1, 0.05) for a in ids]
    assert first == [split_of(a, 0.1, 0.05) for a in ids]
    share = {s: first.count(s) / len(ids) for s in ("train", "valid", "test")}
    assert share["valid"] == pytest.approx(0.1, abs=0.01)
    assert share["test"] == pytest.approx(0.05, abs=0.01)


def test_tokenizer_round_trips_and_has_configured_size(tmp_path):
    texts = [a["text"] for a in synthetic_news(300, seed=1)]
    tok = train_word_tokenizer(texts, vocab_size=60)
    assert len(tok) == 60
    assert tok.convert_tokens_to_ids("[PAD]") == PAD_ID and tok.unk_token_id == UNK_ID
    save_tokenizer(tok, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    sentence = "shares of globex were up 12 cents in london ."
    ids = loaded(sentence)["input_ids"]
    vocab = loaded.get_vocab()
    expected = [w if w in vocab else "[UNK]" for w in sentence.split()]
    assert loaded.convert_ids_to_tokens(ids) == expected
    assert len(loaded) == 60


def test_blocks_pad_and_truncate_to_seq_len():
    tok = train_word_tokenizer(["a b c d e f g h"], vocab_size=20)
    blocks = encode_blocks(tok, ["a b", "a b c d e f g h", ""], seq_len=4)
    assert blocks["input_ids"].shape == (3, 4) and blocks["input_ids"].dtype == np.int64
    assert blocks["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert blocks["input_ids"][0, 2:].tolist() == [PAD_ID, PAD_ID]
    assert blocks["input_ids"][0, :2].tolist() == tok("a b")["input_ids"]
    assert blocks["input_ids"][1].tolist() == tok("a b c d e f g h")["input_ids"][:4]
    assert blocks["input_ids"][2].tolist() == [PAD_ID] * 4
    assert encode_blocks(tok, [], seq_len=4)["input_ids"].shape == (0, 4)


def test_local_jsonl_gz_and_text_sources(tmp_path):
    rows = [{"id": f"a{i}", "text": f"line {i} one two three\nsecond line of {i} here",
             "title": f"Title {i}"} for i in range(50)]
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    cfg = load_config(None, [f"data.source={path}", "data.title_column=title",
                             "data.lowercase=false", "data.valid_fraction=0",
                             "data.test_fraction=0", "data.min_words=1"]).data
    segments = read_segments(cfg)["train"]
    assert len(segments) == 150 and segments[:3] == ["Title 0", "line 0 one two three",
                                                      "second line of 0 here"]

    text_file = tmp_path / "plain.txt"
    text_file.write_text("first article words here\n\nsecond article words here\n")
    cfg = load_config(None, [f"data.source={tmp_path}/*.txt", "data.valid_fraction=0",
                             "data.test_fraction=0"]).data
    assert read_segments(cfg)["train"] == ["first article words here",
                                           "second article words here"]
    with pytest.raises(DataError, match="no such file or directory"):
        read_segments(load_config(None, [f"data.source={tmp_path}/nope.jsonl"]).data)


def test_prepared_in_process_splits_do_not_share_articles_and_batches_cover_data(tmp_path):
    cfg = load_config(None, ["data.synthetic_size=300", "data.seq_len=16", "data.vocab_size=100",
                             "data.valid_fraction=0.2", f"data.out_dir={tmp_path}"]).data
    prepared = prepare_local(cfg)
    assert len(prepared_tokenizer(prepared.location)) <= 100
    train = read_split_blocks(prepared.path, "train")
    valid = read_split_blocks(prepared.path, "valid")
    assert train["input_ids"].shape[1] == 16 and len(valid["input_ids"]) > 0
    splits = prepared.manifest["splits"]
    assert len(train["input_ids"]) == splits["train"]["segments"]
    assert sum(s["segments"] for s in splits.values()) == prepared.manifest["segments"]
    # an epoch is a permutation of the split (every row at most once, the tail dropped), in
    # an order of its own (seed, epoch)
    n = len(train["input_ids"])
    indexed = {**train, "index": np.arange(n)}
    two = [b["index"].numpy() for b in iterate_batches(indexed, 8, seed=0, epochs=2)]
    first, second = np.concatenate(two[:n // 8]), np.concatenate(two[n // 8:])
    assert len(first) == len(set(first.tolist())) == n // 8 * 8 == len(second)
    assert not np.array_equal(first, np.arange(len(first))) and not np.array_equal(first, second)
    again = np.concatenate([b["index"].numpy() for b in iterate_batches(indexed, 8, seed=0,
                                                                        epochs=1)])
    assert np.array_equal(first, again)
    # a resumed run's `start` skips batches by arithmetic: the same batches as skipping them
    for start in (0, 3, n // 8, n // 8 + 2):
        skipped = [b["index"].numpy() for b in iterate_batches(indexed, 8, seed=0, epochs=2,
                                                               start=start)]
        assert len(skipped) == len(two) - start
        assert all(np.array_equal(a, b) for a, b in zip(skipped, two[start:], strict=True))
    assert sum(len(b["input_ids"]) for b in chunk_batches(valid, 7)) == len(valid["input_ids"])
    assert prepare_local(cfg).reused


def test_arrow_json_parsing_equals_json_loads_on_hostile_lines(tmp_path):
    """Every line Arrow's JSON reader might read differently from `json.loads` either gives
    the same article or sends its block to `json.loads`."""
    import pyarrow as pa

    from raydiff.data.parse import parse_lines
    from raydiff.data.records import LINE, RECORDS, InputFile

    blocks = [  # one block each: a refusal anywhere sends the whole block to Python
        ['{"id": "a", "text": "plain", "title": "T"}', '{"text": "no id"}',
         '{"id": "b", "text": "  \\u3000 "}',
         '{"id": "c", "text": null}', '{"id": "d"}', '{"text": "x", "title": "  "}',
         '{"id": "e", "text": "esc \\n \\u00e9 \\ud83d\\ude00 \\/"}', '{"other": [1, {"a": 2}]}'],
        ['{"id": 1, "text": "ints"}', '{"id": 2, "text": "only"}'],
        ['{"id": "a", "text": "x"}', '{"id": 7, "text": "mixed id types"}'],
        ['{"id": 1.0, "text": "float id"}'], ['{"id": true, "text": "bool id"}'],
        ['{"id": "a", "text": "x", "text": "dup"}'], ['[1, 2]'], ['"just a string"'],
        ['{"text": NaN}'], ['{"text": 5}'], ['\ufeff{"text": "bom"}'],
        ['{"text": "lone \\ud800 surrogate"}'], ['{"text": "ctl \x01"}'], ['{bad json'],
        ['{"id": 9223372036854775808, "text": "big"}'], ['{"text": "ok"} trailing'],
        ['{"id": "z", "text": "caf\udce9"}'],  # becomes invalid UTF-8 below
    ]
    arrow_reads = 2  # the first two blocks: everything in them Arrow reads as Python does
    cfg = load_config(None, ["data.title_column=title"]).data
    files = [InputFile(0, "f.jsonl", "f.jsonl")]
    from raydiff.data import parse

    for k, lines in enumerate(blocks):
        raws = [line.encode("utf-8", "surrogateescape") for line in lines]
        records = pa.table([pa.array(range(len(raws)), pa.int64()),
                            pa.array([LINE] * len(raws), pa.int8()), pa.array(raws, pa.binary()),
                            pa.nulls(len(raws), pa.string()), pa.nulls(len(raws), pa.string())],
                           schema=RECORDS)
        fast, reference = parse_lines(records, files, cfg), parse_lines(records, files, cfg,
                                                                         fast=False)
        assert fast.to_pylist() == reference.to_pylist(), lines
        took_arrow = parse._with_arrow(records["raw"], np.arange(len(raws)), files[0], cfg)
        assert (took_arrow is not None) == (k < arrow_reads), lines
