"""`raydiff eval`: one checkpoint, one held-out source, every metric of docs/design.md §6.

    held-out blocks --score (one process, or Ray Data actors when large)--> mse, z0^2, token
        accuracy, overall and per abar bucket
    embedding table --> collapse diagnostics
    N samples --> distinct-n, self-BLEU, unique share, length, and perplexity under the
        reference LM, beside the reference LM's perplexity on the real held-out text
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from raydiff.config import apply_overrides
from raydiff.data.batches import chunk_batches
from raydiff.data.blocks import encode_blocks
from raydiff.data.local import read_segments
from raydiff.data.output import read_manifest
from raydiff.data.prepared import prepared_tokenizer, read_split_blocks
from raydiff.data.records import SPLITS
from raydiff.data.storage import DataError, Location
from raydiff.errors import RaydiffError
from raydiff.eval.generate import SamplerSettings, generate
from raydiff.eval.loading import LoadedDiffusion, load_diffusion, load_reference, same_vocabulary
from raydiff.eval.metrics import (
    distinct_n,
    embedding_diagnostics,
    self_bleu,
    unigram_entropy,
    unique_share,
)
from raydiff.eval.scoring import score_in_process, score_with_ray, summarize_scores
from raydiff.model.reference_lm import perplexity

Progress = Callable[[str, int, int | None], None]  # (stage, advance, total)


@dataclass
class EvalOptions:
    split: Literal["auto", "train", "valid", "test", "all"] = "auto"
    max_examples: int | None = None  # the first N held-out blocks
    num_samples: int = 64
    sampler: dict = field(default_factory=dict)  # SamplerSettings overrides (None: checkpoint's)
    seed: int = 0  # t and noise of the scores; the samples
    use_ema: bool = True
    reference: str | None = None  # reference LM checkpoint; without it no perplexities
    batch_size: int = 256
    use_ray: Literal["auto", "on", "off"] = "auto"
    ray_min_examples: int = 20_000  # "auto" scores at least this many examples on Ray Data
    num_actors: int | None = None  # Ray Data scoring actors (default: one per cluster CPU)
    address: str | None = None  # Ray to join (default: the checkpoint's ray.address, RAY_ADDRESS)


# ----------------------------------------------------------------------------- the data


def _is_prepared(source: str, loaded: LoadedDiffusion) -> Location | None:
    try:
        location = Location.of(source, loaded.cfg.data)
        return location if read_manifest(location) is not None else None
    except (DataError, OSError):
        return None


def held_out_blocks(source: str, loaded: LoadedDiffusion, split: str = "auto",
                    max_examples: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(blocks, description) of `source`: a prepared directory (read as stored; its tokenizer
    must be the checkpoint's) or raw data (files local or s3, hub id, "synthetic"), cleaned with
    the checkpoint's data settings and tokenized with its tokenizer. `split="auto"` is the test
    split of a prepared directory (valid if test is empty) and all of raw data."""
    if split not in ("auto", "all", *SPLITS):
        raise RaydiffError(f"--split must be auto, all, {', '.join(SPLITS)}; got {split!r}")
    prepared = _is_prepared(source, loaded)
    if prepared is not None:
        if not same_vocabulary(prepared_tokenizer(prepared), loaded.tokenizer):
            raise DataError(f"{source}: prepared with a different tokenizer than checkpoint "
                            f"{loaded.path}; pass the raw source instead")
        manifest = read_manifest(prepared)
        names = list(SPLITS) if split == "all" else [split]
        if split == "auto":
            names = ["test" if manifest["splits"]["test"]["segments"] else "valid"]
        parts = [read_split_blocks(source, name, loaded.cfg.data) for name in names]
        blocks = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        kind = "prepared"
    else:
        data_cfg = apply_overrides(loaded.cfg, {"data.source": source}).data
        segments = read_segments(data_cfg)  # any source, in this process
        names = list(SPLITS) if split in ("auto", "all") else [split]
        texts = [s for name in names for s in segments[name]]
        if max_examples is not None:
            texts = texts[:max_examples]
        blocks = encode_blocks(loaded.tokenizer, texts, loaded.cfg.data.seq_len)
        kind = "raw"
    if max_examples is not None:
        blocks = {k: v[:max_examples] for k, v in blocks.items()}
    if blocks["input_ids"].shape[0] == 0:
        raise DataError(f"{source}: no {'/'.join(names)} examples to evaluate")
    return blocks, {"source": source, "kind": kind, "split": "+".join(names),
                    "examples": int(blocks["input_ids"].shape[0])}


# ----------------------------------------------------------------------------- the run


def reference_perplexity(model, token_lists: list[list[int]], seq_len: int,
                          batch_size: int) -> tuple[float, int]:
    ids = np.zeros((len(token_lists), seq_len), np.int64)
    mask = np.zeros((len(token_lists), seq_len), np.int8)
    for row, tokens in enumerate(token_lists):
        tokens = tokens[:seq_len]
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return perplexity(model, chunk_batches({"input_ids": ids, "attention_mask": mask},
                                           batch_size))


def evaluate(checkpoint: str, source: str, options: EvalOptions | None = None,
             progress: Progress | None = None) -> dict:
    """Every metric of one checkpoint on one held-out source, as a JSON-ready dict."""
    opts = options or EvalOptions()
    report = progress or (lambda stage, advance, total: None)
    loaded = load_diffusion(checkpoint, use_ema=opts.use_ema)
    settings = SamplerSettings.of(loaded.cfg.diffusion, **opts.sampler)
    reference = None
    if opts.reference is not None:
        ref_model, ref_tokenizer, ref_path = load_reference(opts.reference)
        if not same_vocabulary(ref_tokenizer, loaded.tokenizer):
            raise DataError(f"reference LM {ref_path} uses a different tokenizer than "
                            f"checkpoint {loaded.path}")
        reference = ref_model

    blocks, data_info = held_out_blocks(source, loaded, opts.split, opts.max_examples)
    n = data_info["examples"]
    use_ray = opts.use_ray == "on" or (opts.use_ray == "auto" and n >= opts.ray_min_examples)
    report("score", 0, n)
    if use_ray:
        import ray

        from raydiff.runtime import start_ray

        start_ray(opts.address or loaded.cfg.ray.address,
                  connect_timeout_s=loaded.cfg.ray.connect_timeout_s)
        actors = opts.num_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        scores = score_with_ray(str(loaded.path), opts.use_ema, blocks, opts.seed, actors,
                                opts.batch_size)
        report("score", n, n)
    else:
        scores = score_in_process(loaded, blocks, opts.seed, opts.batch_size,
                                  on_batch=lambda k: report("score", k, n))

    report("sample", 0, opts.num_samples)
    samples = generate(loaded, opts.num_samples, settings, seed=opts.seed,
                       batch_size=min(opts.batch_size, 64),
                       on_batch=lambda k: report("sample", k, opts.num_samples))
    words = [s.words for s in samples]
    gen_ppl = ref_ppl = math.nan
    if reference is not None:
        report("reference", 0, None)
        gen_ppl, _ = reference_perplexity(reference, [s.token_ids for s in samples],
                                           loaded.cfg.data.seq_len, opts.batch_size)
        # the held-out blocks are already right-padded (ids, mask) batches: score them as they are
        ref_ppl, _ = perplexity(reference, chunk_batches(blocks, opts.batch_size))

    # real text's entropy from as many held-out sequences as there are samples (the plug-in
    # estimate depends on the number of tokens)
    real = [row[mask.astype(bool)] for row, mask in
            zip(blocks["input_ids"][:len(samples)], blocks["attention_mask"][:len(samples)],
                strict=True)]
    summary = summarize_scores(scores)
    with torch.no_grad():
        diagnostics = embedding_diagnostics(loaded.model.embedding_table())
    return {
        "checkpoint": str(loaded.path), "step": loaded.step, "data": data_info,
        "scored_on": "ray_data" if use_ray else "in_process", "seed": opts.seed,
        "use_ema": opts.use_ema,
        "mse": summary["mse"], "z0_sq_norm": summary["z0_sq_norm"],
        "mse_over_z0_sq": summary["mse_over_z0_sq"], "token_accuracy": summary["token_accuracy"],
        "by_abar": summary["by_abar"], "embedding": diagnostics,
        "sampler": settings.describe(loaded.schedule.num_steps),
        "num_samples": len(samples),
        "gen_ppl": gen_ppl, "ref_ppl_real": ref_ppl,
        "sample_entropy": unigram_entropy([s.token_ids for s in samples]),
        "real_entropy": unigram_entropy(real),
        "reference": str(opts.reference) if opts.reference else None,
        "distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2),
        "distinct_3": distinct_n(words, 3), "self_bleu": self_bleu(words),
        "unique_share": unique_share(words),
        "mean_length": float(np.mean([len(s.token_ids) for s in samples])),
        "examples": [s.text for s in samples[:5]],
    }
