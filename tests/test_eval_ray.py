"""Evaluation at scale: Ray Data batch inference scores like one process does, and the reference
LM trains on Ray Train from the same prepared data as the diffusion model."""

import json

import numpy as np
import pytest

from raydiff import cli
from raydiff.config import apply_overrides
from raydiff.data.storage import DataError
from raydiff.eval.evaluate import held_out_blocks
from raydiff.eval.loading import load_diffusion, load_reference
from raydiff.eval.scoring import SCORE_COLUMNS, score_in_process, score_with_ray
from raydiff.train.local import train_local
from raydiff.train.trainer import train_on_ray

pytestmark = pytest.mark.timeout(600)


def test_ray_data_scoring_equals_in_process_scoring(ray_session, smoke_cfg):
    run = train_local(apply_overrides(smoke_cfg, {"train.max_steps": 20, "train.eval_every": 20,
                                                  "train.checkpoint_every": 20,
                                                  "data.synthetic_size": 200}))
    loaded = load_diffusion(run.run_dir)
    blocks, _ = held_out_blocks("synthetic", loaded, split="all", max_examples=600)
    local = score_in_process(loaded, blocks, seed=7, batch_size=64)
    distributed = score_with_ray(str(loaded.path), True, blocks, seed=7, num_actors=2,
                                 batch_size=100)  # other batches, other workers
    for column in SCORE_COLUMNS:
        np.testing.assert_allclose(distributed[column], local[column], rtol=1e-5, atol=1e-6)
    other_seed = score_in_process(loaded, blocks, seed=8, batch_size=64)
    assert not np.array_equal(other_seed["t"], local["t"])


def test_reference_lm_on_ray_train_and_eval_of_a_prepared_directory(ray_session, smoke_cfg,
                                                                    tmp_path):
    cfg = apply_overrides(smoke_cfg, {
        "train.max_steps": 10, "train.log_every": 5, "train.eval_every": 10,
        "train.checkpoint_every": 10, "data.synthetic_size": 200,
        "data.out_dir": str(tmp_path / "data"), "ray.num_workers": 2,
        "reference.hidden_size": 32, "reference.num_layers": 1})
    diffusion = train_local(cfg)  # the diffusion model on Ray Train: tests/test_ray_train.py
    reference = train_on_ray(apply_overrides(cfg, {"train.run_name": "smoke-reference"}),
                             kind="reference")
    reports = [json.loads(x) for x in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == [5, 10] and reports[-1]["val_ppl"] > 1
    model, tokenizer, _ = load_reference(reference.run_dir)
    assert model.config.n_layer == 1 and len(tokenizer) == len(load_diffusion(
        diffusion.run_dir).tokenizer)

    prepared = next((tmp_path / "data").iterdir())  # the directory `prepare` wrote
    out = tmp_path / "m.json"
    assert cli.main(["eval", "--checkpoint", str(diffusion.run_dir), "--data", str(prepared),
                     "--reference", str(reference.run_dir), "--num-samples", "4",
                     "--steps", "5", "--ray", "on", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["data"]["kind"] == "prepared" and m["scored_on"] == "ray_data"
    assert m["data"]["split"] in ("test", "valid") and m["gen_ppl"] > 1

    # a prepared directory tokenized differently is refused, not silently misread
    other = train_local(apply_overrides(cfg, {"data.vocab_size": 60, "train.run_name": "other",
                                              "train.max_steps": 2}))
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        held_out_blocks(str(prepared), load_diffusion(other.run_dir))
