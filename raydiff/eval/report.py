"""Evaluation results for people (a rich table) and for programs (JSON, NaN as null)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table

from raydiff.console import fmt
from raydiff.files import write_atomic


def json_ready(value):
    """NaN/inf (not valid JSON) become null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def write_json(path: str | Path, metrics: dict) -> None:
    write_atomic(path, json.dumps(json_ready(metrics), indent=2) + "\n")


def metrics_tables(m: dict) -> list[Table]:
    """The headline metrics, then mse and token accuracy per noise-level (abar) bucket."""
    table = Table(title=f"eval of {m['checkpoint']} (step {m['step']}) on {m['data']['source']} "
                        f"[{m['data']['split']}, {m['data']['examples']} blocks]")
    table.add_column("metric")
    table.add_column("value", justify="right")
    e = m["embedding"]
    rows = [
        ("mse (t ~ U, fixed seed)", m["mse"]), ("mean squared z0 (z0_sq_norm)", m["z0_sq_norm"]),
        ("mse / z0_sq_norm", m["mse_over_z0_sq"]), ("token accuracy", m["token_accuracy"]),
        ("embedding row norm mean / std",
         f"{fmt(e['emb_norm_mean'])} / {fmt(e['emb_norm_std'])}"),
        ("embedding mean pairwise cosine", e["emb_mean_cosine"]),
        ("embedding effective rank", e["emb_effective_rank"]),
        (f"samples ({m['sampler']['sampler']}, {m['sampler']['steps']} steps)", m["num_samples"]),
        ("gen perplexity (reference LM)", m["gen_ppl"]),
        ("real held-out perplexity (reference LM)", m["ref_ppl_real"]),
        ("unigram entropy, samples / real (nats)",
         f"{fmt(m['sample_entropy'])} / {fmt(m['real_entropy'])}"),
        ("distinct-1 / 2 / 3", " / ".join(fmt(m[f"distinct_{n}"]) for n in (1, 2, 3))),
        ("self-BLEU", m["self_bleu"]), ("unique share", m["unique_share"]),
        ("mean length (tokens)", m["mean_length"]),
    ]
    for name, value in rows:
        table.add_row(name, value if isinstance(value, str) else fmt(value))

    buckets = Table(title="by noise level (abar = signal fraction)")
    for name in ("abar", "examples", "mse", "mse / z0^2", "token accuracy"):
        buckets.add_column(name, justify="right")
    for b in m["by_abar"]:
        buckets.add_row(f"[{b['abar_lo']:.1f}, {b['abar_hi']:.1f}]", str(b["count"]),
                        fmt(b["mse"]), fmt(b["mse_over_z0_sq"]), fmt(b["token_accuracy"]))
    return [table, buckets]
