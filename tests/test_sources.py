"""Every source kind through the Ray Data pipeline, S3 against a real HTTP endpoint, bad input
counted or refused in one line, and streaming prepared data to trainers."""

import gzip
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydiff.config import load_config
from raydiff.data.pipeline import prepare
from raydiff.data.prepared import read_split_blocks, training_datasets
from raydiff.data.records import MAX_LINE_BYTES
from raydiff.data.sources import output_location
from raydiff.data.storage import DataError, Location
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(300)


def _articles(n, prefix="a"):
    return [{"id": f"{prefix}{i}", "title": f"Report {i}",
             "text": f"Acme shares rose {i} pct on monday.\nTraders said volume was light {i}."}
            for i in range(n)]


def _cfg(tmp_path, source, *extra):
    return load_config(None, [f"data.source={source}", f"data.out_dir={tmp_path / 'out'}",
                              "data.seq_len=12", "data.vocab_size=80", *extra]).data


def test_s3_source_and_s3_output(ray_session, s3_server, tmp_path):
    creds = [f"data.s3_endpoint={s3_server['endpoint']}",
             f"data.s3_access_key_id={s3_server['key']}",
             f"data.s3_secret_access_key={s3_server['secret']}"]
    cfg = load_config(None, ["data.source=s3://corpus/news/", "data.out_dir=s3://prepared/runs",
                             "data.seq_len=12", "data.vocab_size=80", *creds]).data
    fs = Location.of("s3://corpus", cfg).fs
    fs.mkdir("corpus")
    fs.mkdir("prepared")
    body = "".join(json.dumps(a) + "\n" for a in _articles(60)).encode()
    fs.pipe("corpus/news/part-0.jsonl.gz", gzip.compress(body))
    fs.pipe("corpus/news/part-1.jsonl", "".join(json.dumps(a) + "\n"
                                                for a in _articles(40, "b")).encode())

    result = prepare(cfg)
    assert result.path.startswith("s3://prepared/runs/")
    assert result.manifest["articles"] == 100 and len(result.manifest["files"]) == 2
    assert fs.exists(result.path + "/manifest.json")
    assert fs.exists(result.path + "/tokenizer/tokenizer.json")
    train = read_split_blocks(result.path, "train", cfg)
    assert train["input_ids"].shape == (result.manifest["splits"]["train"]["segments"], 12)
    assert s3_server["secret"] not in json.dumps(result.manifest)
    assert prepare(cfg).reused


def test_s3_errors_are_one_line_and_fast(s3_server):
    def error_for(*overrides):
        cfg = load_config(None, ["data.source=s3://corpus/news/", *overrides]).data
        start = time.perf_counter()
        with pytest.raises(DataError) as err:
            output_location(cfg)
        assert time.perf_counter() - start < 15
        assert "\n" not in str(err.value)
        return str(err.value)

    denied = error_for(f"data.s3_endpoint={s3_server['endpoint']}",
                       "data.s3_access_key_id=AKIAWRONG", "data.s3_secret_access_key=nope")
    assert "access denied" in denied and "nope" not in denied
    assert "cannot reach the S3 endpoint" in error_for(
        "data.s3_endpoint=http://127.0.0.1:1", "data.s3_access_key_id=a",
        "data.s3_secret_access_key=b")
    assert "no such bucket or key" in error_for(
        f"data.s3_endpoint={s3_server['endpoint']}", f"data.s3_access_key_id={s3_server['key']}",
        f"data.s3_secret_access_key={s3_server['secret']}", "data.source=s3://corpus/nothing")


def test_hub_loading_code_on_files_written_by_datasets(ray_session, tmp_path):
    import datasets

    path = tmp_path / "hub.parquet"
    datasets.Dataset.from_list(_articles(50)).to_parquet(str(path))
    cfg = _cfg(tmp_path, "parquet", f"data.hub_data_files={path}", "data.title_column=title")
    result = prepare(cfg)
    assert result.manifest["articles"] == 50
    assert result.path.rsplit("/", 1)[1].startswith("parquet-")
    tokens = set(read_split_blocks(result.path, "train")["input_ids"].ravel().tolist())
    assert len(tokens) > 10
    with pytest.raises(DataError, match="missing-\\*.json: matches no files"):
        prepare(_cfg(tmp_path, "json", f"data.hub_data_files={tmp_path}/missing-*.json"))


def test_bad_inputs_are_counted_and_skipped(ray_session, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps(a) for a in _articles(30)]
    lines += ["{oops", json.dumps({"id": "x", "text": ""}), json.dumps({"id": "y"}),
              json.dumps({"id": "z", "text": "w " * (MAX_LINE_BYTES // 2 + 10)})]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    (src / "b.jsonl").write_bytes(b'{"id": "u", "text": "caf\xe9"}\n')
    (src / "empty.jsonl").write_bytes(b"")
    (src / "c.txt").write_text("first plain article here today\n\nsecond plain article here\n")
    pq.write_table(pa.Table.from_pylist(_articles(5, "p")), src / "d.parquet")
    result = prepare(_cfg(tmp_path, str(src)))
    m = result.manifest
    assert m["articles"] == 30 + 2 + 5
    assert m["skipped"] == {"malformed_json": 1, "invalid_utf8": 1, "empty_text": 2,
                            "too_long": 1, "empty_file": 1, "corrupt_file": 0}
    glob_only_txt = prepare(_cfg(tmp_path, f"{src}/*.txt")).manifest
    assert glob_only_txt["articles"] == 2


@pytest.mark.ray
def test_missing_path_is_a_one_line_cli_error(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "raydiff.cli", "prepare", f"data.source={tmp_path}/nope.jsonl",
         f"data.out_dir={tmp_path}"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and time.perf_counter() - start < 30
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no such file or directory" in lines[0]


def test_packing_fills_blocks(ray_session, tmp_path):
    plain = prepare(_cfg(tmp_path, "synthetic", "data.synthetic_size=60",
                         "data.seq_len=32")).manifest
    packed = prepare(_cfg(tmp_path, "synthetic", "data.synthetic_size=60", "data.seq_len=32",
                          "data.pack=true")).manifest
    assert packed["segments"] < plain["segments"]
    assert packed["pad_fraction"] < plain["pad_fraction"]


def test_streaming_to_trainers_with_uneven_consumers(ray_session, tmp_path):
    prepared = prepare(_cfg(tmp_path, "synthetic", "data.synthetic_size=200"))
    datasets = training_datasets(prepared.path, rows_per_block=32)
    train = datasets["train"]
    n = train.count()
    assert n == prepared.manifest["splits"]["train"]["segments"]
    assert datasets["valid"].count() == prepared.manifest["splits"]["valid"]["segments"]

    def order(ds):
        return [tuple(r["input_ids"]) for r in ds.take_all()]

    # another block layout holds the same rows
    again = training_datasets(prepared.path, rows_per_block=100)["train"]
    assert sorted(order(again)) == sorted(order(train))

    # two consumers at 3:1 batch sizes, as heterogeneous workers would be; neither hangs
    shards = train.streaming_split(2, equal=False)
    seen = [0, 0]

    def consume(i, batch_size):
        for batch in shards[i].iter_batches(batch_size=batch_size, batch_format="numpy"):
            seen[i] += len(batch["input_ids"])
            time.sleep(0.01)  # a training step

    threads = [threading.Thread(target=consume, args=(i, b)) for i, b in ((0, 24), (1, 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert sum(seen) == n and min(seen) > 0
    batch = next(iter(train.iter_torch_batches(batch_size=4)))
    assert tuple(batch["input_ids"].shape) == (4, 12)  # what trainers receive
    assert np.all(np.isin(read_split_blocks(prepared.path, "train")["attention_mask"], [0, 1]))
