#!/usr/bin/env python
"""Training throughput of one process, printed as JSON.

For each config (default: smoke and reuters) and precision (fp32, bf16 autocast) it times
optimizer steps on full random batches and reports tokens/s, the model FLOPs of one step
(counted by torch.utils.flop_counter), and the MFU against this machine's measured matmul
FLOP/s in the same dtype. bf16 training is skipped where the device has no native bf16 (it would
run hundreds of times slower than fp32); --force-bf16 runs it anyway.

    python scripts/bench_step.py [--configs smoke reuters] [--steps 5] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from raydiff.config import load_config
from raydiff.train.engine import DiffusionEngine
from raydiff.train.precision import native_bf16

ROOT = Path(__file__).resolve().parents[1]


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 2.0):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def bench_config(name: str, precision: str, device: torch.device, steps: int, warmup: int,
                 vocab_size: int | None) -> dict:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    vocab = vocab_size or cfg.data.vocab_size
    B, L = cfg.train.batch_size, cfg.data.seq_len
    engine = DiffusionEngine(cfg, vocab, device, precision=precision)
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, vocab, (B, L), generator=gen),
             "attention_mask": torch.ones(B, L, dtype=torch.long)}
    with FlopCounterMode(display=False) as counter:
        engine.train_step(batch)
    step_flops = counter.get_total_flops()
    for _ in range(warmup):
        engine.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "config": name, "precision": precision, "batch": B, "seq_len": L, "vocab": vocab,
        "params": sum(p.numel() for p in engine.model.parameters()),
        "step_s": elapsed / steps, "tokens_per_s": B * L * steps / elapsed,
        "flops_per_step": step_flops, "achieved_flops": step_flops * steps / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["smoke", "reuters"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--force-bf16", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)

    peak = {"fp32": matmul_flops(torch.float32, device), "bf16": None}
    bf16_native = native_bf16(device)
    if bf16_native or args.force_bf16 or device.type == "cpu":
        peak["bf16"] = matmul_flops(torch.bfloat16, device, n=2048 if bf16_native else 256,
                                    seconds=1.0)
    results = []
    for name in args.configs:
        for precision in args.precisions:
            if precision == "bf16" and not (bf16_native or args.force_bf16):
                results.append({"config": name, "precision": "bf16", "skipped":
                                "no native bf16 on this device (see matmul_flops.bf16)"})
                continue
            r = bench_config(name, precision, device, args.steps, args.warmup,
                             None if name != "smoke" else None)
            r["mfu"] = r["achieved_flops"] / peak[precision] if peak[precision] else None
            results.append(r)
    print(json.dumps({
        "device": str(device), "machine": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "native_bf16": bf16_native, "matmul_flops": peak, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
