"""Sampling speed and quality: DDPM with all T steps against DDIM with 200, 100, 50 and 20 steps
on one checkpoint, scored by one reference LM. Prints JSON.

    python scripts/bench_sample.py                       # trains a small pair first (~3 min CPU)
    python scripts/bench_sample.py --checkpoint RUN --reference RUN-reference

Target (issue 6): DDIM-50 at least 30x faster than DDPM-T with gen-PPL within 10%.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from raydiff.config import load_config
from raydiff.data.batches import chunk_batches
from raydiff.eval.evaluate import held_out_blocks, reference_perplexity
from raydiff.eval.generate import SamplerSettings, generate
from raydiff.eval.loading import load_diffusion, load_reference
from raydiff.eval.metrics import distinct_n, self_bleu
from raydiff.model.reference_lm import perplexity
from raydiff.train.local import train_local

ROOT = Path(__file__).resolve().parents[1]


def train_pair(out: Path, steps: int) -> tuple[Path, Path]:
    """The smoke model at T = 2000 (the paper's T), `steps` steps, and a reference LM (half as
    many), on the synthetic corpus."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"train.output_dir={out}", f"train.max_steps={steps}", f"optim.anneal_steps={steps}",
        "diffusion.num_steps=2000", "train.eval_every=500", "train.checkpoint_every=500",
        "train.log_every=100", "data.synthetic_size=2000", "train.num_threads=2"])
    diffusion = train_local(cfg)
    reference = train_local(load_config(ROOT / "configs" / "smoke.yaml", [
        f"train.output_dir={out}", "train.run_name=smoke-reference",
        f"train.max_steps={max(1, steps // 2)}", f"optim.anneal_steps={max(1, steps // 2)}",
        "train.eval_every=500", "train.checkpoint_every=1000",
        "data.synthetic_size=2000", "reference.hidden_size=128", "reference.num_layers=2",
        "train.num_threads=2"]), kind="reference")
    return diffusion.run_dir, reference.run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--reference")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the denoiser samples (cuda)")
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 100, 50, 20],
                        help="DDIM step counts beside DDPM's T")
    parser.add_argument("--precisions", nargs="+", default=["float32"],
                        choices=["float32", "float64"], help="sample in each (same noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, reference_path = args.checkpoint, args.reference
        if checkpoint is None or reference_path is None:
            checkpoint, reference_path = train_pair(Path(tmp), args.train_steps)
        loaded = load_diffusion(checkpoint, device=args.device)
        reference, _, _ = load_reference(reference_path)
        num_steps = loaded.schedule.num_steps
        runs = [(p, "ddpm", num_steps) for p in args.precisions] + [
            (p, "ddim", k) for k in args.steps if k < num_steps for p in args.precisions]
        results = []
        for precision, sampler, steps in runs:
            settings = SamplerSettings.of(loaded.cfg.diffusion, sampler=sampler, steps=steps,
                                          eta=0.0, clamp=True, precision=precision)
            generate(loaded, 2, settings, seed=args.seed, device=args.device)  # warm-up
            started = time.perf_counter()
            samples = generate(loaded, args.num_samples, settings, seed=args.seed,
                               batch_size=args.batch_size, device=args.device)
            seconds = time.perf_counter() - started
            ppl, _ = reference_perplexity(reference, [s.token_ids for s in samples],
                                           loaded.cfg.data.seq_len, 256)
            words = [s.words for s in samples]
            results.append({
                "sampler": sampler, "steps": steps, "precision": precision,
                "seconds": round(seconds, 3),
                "samples_per_s": round(args.num_samples / seconds, 2), "gen_ppl": round(ppl, 3),
                "distinct_2": round(distinct_n(words, 2), 4),
                "self_bleu": round(self_bleu(words), 4)})
        blocks, _ = held_out_blocks(loaded.cfg.data.source, loaded, split="test")
        real_ppl, _ = perplexity(reference, chunk_batches(blocks, 256))
        ddpm = results[0]
        ddim50 = next((r for r in results if r["sampler"] == "ddim" and r["steps"] == 50
                       and r["precision"] == ddpm["precision"]), None)
        summary = {"checkpoint": str(checkpoint), "T": num_steps, "model": vars(loaded.cfg.model),
                   "num_samples": args.num_samples, "threads": args.threads,
                   "device": args.device, "runs": results,
                   "real_held_out_ppl": round(real_ppl, 3)}
        if ddim50:
            speedup = ddim50["samples_per_s"] / ddpm["samples_per_s"]
            ppl_change = ddim50["gen_ppl"] / ddpm["gen_ppl"] - 1
            summary |= {"ddim50_speedup": round(speedup, 2),
                        "ddim50_gen_ppl_change": round(ppl_change, 4),
                        "target_met": speedup >= 30 and abs(ppl_change) <= 0.10}
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
