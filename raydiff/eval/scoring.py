"""Per-example diffusion scores of held-out blocks: mse, mean squared z0, token accuracy, at a
timestep t ~ uniform. Each example's t and noise come from a generator seeded with (seed, its
index), so a score does not depend on batching: one process and Ray Data batch inference
across workers give the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from raydiff.diffusion import Draws, LossSpec, diffusion_losses
from raydiff.eval.metrics import bucketed

SCORE_COLUMNS = ("t", "abar", "mse", "z0_sq", "token_accuracy")


def example_draws(indices: np.ndarray, num_steps: int, seq_len: int, dim: int, seed: int):
    """t (B,) and the z0-perturbation and forward noise, each (B, L, d), per example index."""
    generator = torch.Generator()
    t, eps0, eps = [], [], []
    for index in indices.tolist():
        # torch's CPU generator keeps 32 bits of a seed: hash (seed, index) into them
        generator.manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        t.append(torch.randint(0, num_steps, (), generator=generator))
        eps0.append(torch.randn(seq_len, dim, generator=generator))
        eps.append(torch.randn(seq_len, dim, generator=generator))
    return torch.stack(t), torch.stack(eps0), torch.stack(eps)


@torch.no_grad()
def score_blocks(loaded, input_ids: np.ndarray, attention_mask: np.ndarray,
                 indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Per-example `SCORE_COLUMNS` of (B, L) blocks for a `LoadedDiffusion`."""
    cfg, model = loaded.cfg, loaded.model
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    mask = torch.as_tensor(attention_mask, device=device)
    t, eps0, eps = example_draws(indices, loaded.schedule.num_steps, ids.shape[1],
                                 cfg.model.embed_dim, seed)
    batch = {"input_ids": ids, "attention_mask": mask}
    terms = diffusion_losses(model, loaded.schedule, batch, LossSpec.of(cfg.diffusion),
                             Draws(t, eps0, eps))
    return {"t": t.numpy(), "abar": loaded.schedule.alphas_cumprod[t].numpy(),
            "mse": terms.mse.cpu().numpy(), "z0_sq": terms.z0_sq.cpu().numpy(),
            "token_accuracy": terms.token_accuracy.cpu().numpy()}


def score_in_process(loaded, blocks: dict[str, np.ndarray], seed: int,
                     batch_size: int = 256, on_batch=None) -> dict[str, np.ndarray]:
    n = blocks["input_ids"].shape[0]
    parts = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        parts.append(score_blocks(loaded, blocks["input_ids"][rows],
                                  blocks["attention_mask"][rows],
                                  np.arange(start, min(start + batch_size, n)), seed))
        if on_batch is not None:
            on_batch(min(batch_size, n - start))
    return {k: np.concatenate([p[k] for p in parts]) for k in SCORE_COLUMNS}


class ScoreWithCheckpoint:
    """A Ray Data actor: loads the checkpoint once, then scores batches of rows
    {"index", "input_ids", "attention_mask"}."""

    def __init__(self, checkpoint: str, use_ema: bool, seed: int, num_threads: int = 1):
        from raydiff.eval.loading import load_diffusion

        torch.set_num_threads(num_threads)
        self.loaded, self.seed = load_diffusion(checkpoint, use_ema=use_ema), seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = score_blocks(self.loaded, np.stack(batch["input_ids"]),
                              np.stack(batch["attention_mask"]), batch["index"], self.seed)
        return {"index": batch["index"]} | scores


def score_with_ray(checkpoint: str, use_ema: bool, blocks: dict[str, np.ndarray], seed: int,
                   num_actors: int, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The same scores as `score_in_process`, as Ray Data batch inference over `num_actors`
    actors (one CPU each; Ray must be initialised)."""
    import pyarrow as pa
    import ray.data

    n, length = blocks["input_ids"].shape
    table = pa.table({
        "index": pa.array(np.arange(n, dtype=np.int64)),
        "input_ids": pa.FixedSizeListArray.from_arrays(
            pa.array(blocks["input_ids"].astype(np.int32).ravel()), length),
        "attention_mask": pa.FixedSizeListArray.from_arrays(
            pa.array(blocks["attention_mask"].astype(np.int8).ravel()), length),
    })
    # blocks made here on the driver: no repartition task competes with the actors for CPUs
    pieces = [table.slice(start, batch_size) for start in range(0, n, batch_size)]
    scored = ray.data.from_arrow(pieces).map_batches(
        ScoreWithCheckpoint, fn_constructor_kwargs={"checkpoint": checkpoint,
                                                    "use_ema": use_ema, "seed": seed},
        compute=ray.data.ActorPoolStrategy(size=num_actors), batch_size=batch_size,
        batch_format="numpy", num_cpus=1)
    rows = scored.to_arrow_refs()
    merged = pa.concat_tables(ray.get(rows)).sort_by("index")
    return {k: merged[k].to_numpy() for k in SCORE_COLUMNS}


def summarize_scores(scores: dict[str, np.ndarray]) -> dict:
    """The paper's mse with mean squared z0 beside it, token accuracy, and both per abar bucket."""
    mse, z0_sq = float(scores["mse"].mean()), float(scores["z0_sq"].mean())
    buckets = bucketed(scores["abar"], {"mse": scores["mse"], "z0_sq": scores["z0_sq"],
                                        "token_accuracy": scores["token_accuracy"]})
    for row in buckets:
        row["mse_over_z0_sq"] = row["mse"] / row["z0_sq"] if row["count"] else float("nan")
    return {"mse": mse, "z0_sq_norm": z0_sq, "mse_over_z0_sq": mse / max(z0_sq, 1e-12),
            "token_accuracy": float(scores["token_accuracy"].mean()),
            "num_examples": int(scores["mse"].shape[0]), "by_abar": buckets}
