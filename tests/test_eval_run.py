"""`raydiff sample` and `raydiff eval` on tiny checkpoints trained inside the test."""

import json
import math

import pytest

from raydiff import cli
from raydiff.config import apply_overrides
from raydiff.eval.evaluate import held_out_blocks
from raydiff.eval.loading import load_diffusion
from raydiff.train.local import train_local

REQUIRED = ("mse", "z0_sq_norm", "token_accuracy", "gen_ppl", "ref_ppl_real", "distinct_1",
            "distinct_2", "distinct_3", "self_bleu", "unique_share", "sample_entropy",
            "real_entropy")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 40-step diffusion run and a 40-step reference LM on the synthetic corpus."""
    from raydiff.config import load_config
    from tests.conftest import ROOT

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"train.output_dir={out}", "train.max_steps=40", "train.eval_every=20",
        "train.checkpoint_every=20", "train.log_every=20", "data.synthetic_size=200"])
    diffusion = train_local(cfg)
    reference = train_local(apply_overrides(cfg, {
        "train.run_name": "smoke-reference", "reference.hidden_size": 32,
        "reference.num_layers": 1}), kind="reference")
    return diffusion.run_dir, reference.run_dir


def test_sample_writes_jsonl_of_well_formed_samples(trained, tmp_path, capsys):
    run_dir, _ = trained
    out = tmp_path / "samples.jsonl"
    code = cli.main(["sample", "--checkpoint", str(run_dir), "--num-samples", "5",
                     "--batch-size", "2", "--sampler", "ddim", "--steps", "10", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    loaded = load_diffusion(run_dir)
    for row in rows:
        assert row["steps"] == 10 and row["sampler"] == "ddim" and row["step"] == 40
        assert 0 < row["num_tokens"] == len(row["token_ids"]) <= loaded.cfg.data.seq_len
        assert all(0 < i < len(loaded.tokenizer) for i in row["token_ids"])  # PAD removed
        assert row["text"] == loaded.tokenizer.decode(row["token_ids"])
    # the same seed and batch size give the same samples
    again = tmp_path / "again.jsonl"
    cli.main(["sample", "--checkpoint", str(run_dir), "--num-samples", "5", "--batch-size", "2",
              "--sampler", "ddim", "--steps", "10", "--out", str(again)])
    assert again.read_text() == out.read_text()


def test_eval_reports_every_metric_on_raw_held_out_data(trained, tmp_path):
    run_dir, reference_dir = trained
    out = tmp_path / "metrics.json"
    code = cli.main(["eval", "--checkpoint", str(run_dir), "--data", "synthetic",
                     "--reference", str(reference_dir), "--split", "test", "--num-samples", "8",
                     "--steps", "10", "--out", str(out)])
    assert code == 0
    m = json.loads(out.read_text())
    for key in REQUIRED:
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["data"]["kind"] == "raw" and m["data"]["split"] == "test"
    # 8 real sequences (as many as samples) spread over many words: far from 0, below log(V)
    assert 2.0 < m["real_entropy"] < math.log(len(load_diffusion(run_dir).tokenizer))
    assert sum(b["count"] for b in m["by_abar"]) == m["data"]["examples"] > 0
    assert m["mse_over_z0_sq"] == pytest.approx(m["mse"] / m["z0_sq_norm"])
    assert 0 <= m["token_accuracy"] <= 1 and 0 <= m["self_bleu"] <= 1
    assert all(0 < m[f"distinct_{n}"] <= 1 for n in (1, 2, 3))
    assert m["num_samples"] == 8 and m["sampler"]["steps"] == 10
    assert m["gen_ppl"] > 1 and m["ref_ppl_real"] > 1
    # a fixed seed: evaluating again gives the same numbers
    again = tmp_path / "again.json"
    cli.main(["eval", "--checkpoint", str(run_dir), "--data", "synthetic", "--split", "test",
              "--num-samples", "8", "--steps", "10", "--out", str(again)])
    m2 = json.loads(again.read_text())
    assert m2["mse"] == m["mse"] and m2["distinct_2"] == m["distinct_2"]
    assert m2["gen_ppl"] is None and m2["ref_ppl_real"] is None  # no reference LM given


def test_eval_reads_raw_jsonl_files_with_the_checkpoints_tokenizer(trained, tmp_path):
    run_dir, _ = trained
    source = tmp_path / "news.jsonl"
    source.write_text("\n".join(json.dumps({"id": str(i), "text": t}) for i, t in enumerate([
        "Oil prices rose in London on Monday. Steel exports fell.",
        "The bank said grain imports were 18 mln dlrs. Copper closed higher in New York.",
    ])) + "\n")
    loaded = load_diffusion(run_dir)
    blocks, info = held_out_blocks(str(source), loaded)
    assert info["kind"] == "raw" and info["split"] == "train+valid+test"  # raw: all of it
    first = blocks["input_ids"][0][blocks["attention_mask"][0] == 1].tolist()
    assert loaded.tokenizer.convert_ids_to_tokens(first)[:3] == ["oil", "prices", "rose"]
    out = tmp_path / "m.json"
    assert cli.main(["eval", "--checkpoint", str(run_dir), "--data", str(source),
                     "--num-samples", "4", "--steps", "5", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["data"]["examples"] == blocks["input_ids"].shape[0] >= 2


def test_missing_or_corrupt_checkpoints_fail_with_one_line(trained, tmp_path, capsys):
    run_dir, reference_dir = trained
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint or run directory" in err and len(err.strip().splitlines()) == 1

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "checkpoints" / "step_00000040", broken)
    (broken / "state.pt").write_bytes(b"not a checkpoint")
    assert cli.main(["eval", "--checkpoint", str(broken), "--data", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "state.pt has 16 bytes" in err and len(err.strip().splitlines()) == 1  # its record

    # a reference LM is not a diffusion model, and the other way round
    assert cli.main(["sample", "--checkpoint", str(reference_dir)]) == 2
    assert "not a diffusion model" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(run_dir), "--data", "synthetic",
                     "--reference", str(run_dir)]) == 2
    assert "not a reference LM checkpoint" in capsys.readouterr().err
