#!/usr/bin/env python
"""Training throughput of one process, printed as JSON.

For each config (default: the smoke and ablation-small sizes and the paper's reuters size) and
precision it times optimizer steps on full random batches and reports tokens/s, the model FLOPs
of one step (counted by torch.utils.flop_counter) and the MFU against this device's measured
matmul FLOP/s in that dtype. bf16 is skipped where the device has no native bf16 (it would run
hundreds of times slower than fp32); --force-bf16 runs it anyway.

    python scripts/bench_step.py [--configs smoke tune/ablation-small reuters] [--steps 5]
    python scripts/bench_step.py --anchor ../shared/anchors/minimal-text-diffusion --rounds 3
    python scripts/bench_step.py --configs smoke tune/ablation-small --compile default --floor

--anchor times the reference code base's own training step (minimal-text-diffusion, through
../shared/tools/mtd_bench.py in a subprocess, so none of its code lives here) and raydiff's at
the same model, batch and device, alternating round by round, and prints both and their ratio.
Each config is timed as the plain step (transformers' BertEncoder, the denoiser's encoder until
session 10, the cross-entropy over materialised (N, V) logits, as until session 11, and every
diagnostic on every step: `speedup_vs_eager` 1), with raydiff's own BERT layers
(raydiff.model.encoder), then also with the chunked tied-head cross-entropy
(raydiff.model.head_ce), as the step the training loop takes between reports (no diagnostics),
and with --compile MODE also compiled (`train.compile=MODE`: the whole training objective,
`raydiff.diffusion.losses.DiffusionObjective`; timed after its compilation, whose
seconds are reported): all in the same run, alternating over `--rounds` rounds of `--steps`
steps, each variant's step time the median of its rounds' medians, and `paired_speedup` the
median over rounds of the plain step's time over the variant's. MFU counts the plain step's
FLOPs (the model's), not the chunked head's recomputed logits. --floor (CPU) adds, to the row of
the step between reports, what no rewrite of the step's Python or elementwise work would remove:
its matrix products and attention kernels replayed back to back, and its update (clipping, AdamW,
EMA), each timed alone, beside half the plain step (the 2x target).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from raydiff.config import Config, apply_overrides, load_config
from raydiff.model import denoiser
from raydiff.train.engine import DiffusionEngine
from raydiff.train.precision import native_bf16

ROOT = Path(__file__).resolve().parents[1]
MTD_BENCH = ROOT.parent / "shared" / "tools" / "mtd_bench.py"


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class BertLayers(torch.nn.Module):
    """transformers' BertEncoder behind raydiff's encoder interface: the denoiser's encoder
    until session 10 (raydiff.model.encoder computes the same layers), for the baseline row."""

    def __init__(self, hidden_size, num_layers, num_heads, intermediate_size, dropout):
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEncoder
        self.bert = BertEncoder(BertConfig(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            intermediate_size=intermediate_size, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout, attn_implementation="sdpa"))

    def forward(self, h, mask=None):
        return self.bert(h, attention_mask=mask).last_hidden_state


@contextlib.contextmanager
def bert_encoder(use: bool):
    """Denoisers built inside take `BertLayers` as their encoder (when `use`)."""
    original = denoiser.Encoder
    denoiser.Encoder = BertLayers if use else original
    try:
        yield
    finally:
        denoiser.Encoder = original


def materialised_token_ce(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """`Denoiser.token_ce` as it was until session 11: F.cross_entropy over the (B, L, V)
    logits, for the baseline rows."""
    logits = x @ self.embedding_table().t() + self.lm_bias
    flat = F.cross_entropy(logits.float().flatten(0, 1), input_ids.flatten(), reduction="none")
    return flat.view(input_ids.shape)


class Timed:
    """One variant of the step (config, precision, encoder, head, diagnostics): its engine,
    built and warmed up once (compiled, the first step compiles), then timed in rounds."""

    def __init__(self, cfg: Config, name: str, precision: str, device: torch.device,
                 warmup: int, diagnostics: bool = False, bert: bool = False,
                 chunked_head: bool = True):
        self.name, self.precision, self.device = name, precision, device
        self.cfg, self.diagnostics, self.bert = cfg, diagnostics, bert
        self.chunked_head = chunked_head
        vocab = cfg.data.vocab_size
        B, L = cfg.train.batch_size, cfg.data.seq_len
        with bert_encoder(bert):
            self.engine = DiffusionEngine(cfg, vocab, device, precision=precision)
        if not chunked_head:
            model = self.engine.model
            model.token_ce = types.MethodType(materialised_token_ce, model)
        gen = torch.Generator().manual_seed(0)
        self.batch = {"input_ids": torch.randint(2, vocab, (B, L), generator=gen),
                      "attention_mask": torch.ones(B, L, dtype=torch.long)}
        start = time.perf_counter()
        self.engine.train_step(self.batch)
        _sync(device)
        self.first_step_s = time.perf_counter() - start
        self.flops = None
        if cfg.train.compile == "off":
            with FlopCounterMode(display=False) as counter:
                self.engine.train_step(self.batch)
            self.flops = counter.get_total_flops()
        for _ in range(warmup):
            self.engine.train_step(self.batch, diagnostics=diagnostics)
        self.medians: list[float] = []

    def time(self, steps: int) -> float:
        """Times `steps` steps; appends and returns their median."""
        step = lambda: self.engine.train_step(self.batch, diagnostics=self.diagnostics)  # noqa: E731
        self.medians.append(_median_time(step, steps, self.device))
        return self.medians[-1]

    def row(self) -> dict:
        cfg, B, L = self.cfg, self.cfg.train.batch_size, self.cfg.data.seq_len
        step_s = statistics.median(self.medians)
        return {
            "config": self.name, "precision": self.precision, "compile": cfg.train.compile,
            "diagnostics": self.diagnostics, "encoder": "bert" if self.bert else "raydiff",
            "head": "chunked" if self.chunked_head else "logits",
            "batch": B, "seq_len": L, "vocab": cfg.data.vocab_size,
            "hidden": cfg.model.hidden_size, "layers": cfg.model.num_layers,
            "embed_dim": cfg.model.embed_dim,
            "params": sum(p.numel() for p in self.engine.model.parameters()),
            "first_step_s": self.first_step_s, "step_s": step_s, "round_step_s": self.medians,
            "tokens_per_s": B * L / step_s, "flops_per_step": self.flops,
            "achieved_flops": self.flops / step_s if self.flops else None,
        }


# the kernels no rewrite of the step removes: its matrix products and attention, replayed
FLOOR_OPS = {
    "matmul": {torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
               torch.ops.aten.bmm.default},
    "attention": {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default},
}


class _Recorder(TorchDispatchMode):
    """Records the calls of `FLOOR_OPS` (with copies of their arguments) made under it."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list] = {kind: [] for kind in FLOOR_OPS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for kind, ops in FLOOR_OPS.items():
            if func in ops:
                self.calls[kind].append((func, [_copy(a) for a in args],
                                         {k: _copy(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def step_floor(timed: Timed, repeats: int = 30) -> dict:
    """What a step at `timed`'s size cannot go below with these kernels: the median time of
    its matrix products replayed back to back, of its attention kernels, and of its update
    (gradient clipping with the NaN flag, AdamW, EMA) on gradients already there."""
    engine = timed.engine
    recorder = _Recorder()
    with recorder:
        engine.train_step(timed.batch, diagnostics=False)
    out = {}
    for kind, calls in recorder.calls.items():
        def replay(calls=calls):
            for func, args, kwargs in calls:
                func(*args, **kwargs)
        replay()  # warm
        out[f"{kind}_calls"] = len(calls)
        out[f"{kind}_s"] = _median_time(replay, repeats, timed.device)
    engine.probe_loss(timed.batch).backward()

    def update():  # apply_gradients after its backward, without its zero_grad (the gradients
        # stay for the next repeat), then the EMA
        grad_norm = torch.nn.utils.clip_grad_norm_(
            engine.model.parameters(), engine.cfg.optim.grad_clip or math.inf, foreach=True)
        torch.isfinite(grad_norm).item()
        engine.optimizer.step()
        engine.ema.update(engine.model)
    update()  # warm
    out["update_s"] = _median_time(update, repeats, timed.device)
    engine.optimizer.zero_grad(set_to_none=True)
    return out


def _median_time(fn, repeats: int, device: torch.device) -> float:
    """The median seconds of `repeats` calls of `fn`, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_config(cfg: Config, name: str, precision: str, device: torch.device, steps: int,
                 warmup: int) -> dict:
    """One variant, one round: the default step between reports."""
    timed = Timed(cfg, name, precision, device, warmup)
    timed.time(steps)
    return timed.row()


def mtd_step(anchor: Path, cfg: Config, device: torch.device, steps: int, warmup: int) -> dict:
    """The reference code base's step at `cfg`'s shape, in a subprocess (its own model, loss
    and AdamW; its time embedding and head differ in detail, the matmul shapes do not)."""
    m = cfg.model
    cmd = [sys.executable, str(MTD_BENCH), str(anchor), "--steps", str(steps),
           "--warmup", str(warmup), "--batch", str(cfg.train.batch_size),
           "--seq", str(cfg.data.seq_len), "--layers", str(m.num_layers),
           "--hidden", str(m.hidden_size), "--vocab", str(cfg.data.vocab_size),
           "--emb", str(m.embed_dim), "--threads", str(torch.get_num_threads()),
           "--device", str(device)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{MTD_BENCH} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_by_side(anchor: Path, configs: list[str], device: torch.device, rounds: int,
                 steps: int, warmup: int) -> list[dict]:
    """MTD then raydiff, `rounds` times per config; medians over rounds and their ratio."""
    rows = []
    for name in configs:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        h = cfg.model.hidden_size
        # MTD's encoder (heads of 64, a 4x feed-forward, dropout 0.1) and objective (the
        # rounding CE, whose gradient stops at the embeddings); ours takes the same
        cfg = apply_overrides(cfg, {"model.num_heads": max(1, h // 64),
                                    "model.intermediate_size": 4 * h, "model.dropout": 0.1,
                                    "diffusion.loss": "rounding"})
        theirs, ours = [], []
        for _ in range(rounds):
            theirs.append(mtd_step(anchor, cfg, device, steps, warmup)["tokens_per_s"])
            ours.append(bench_config(cfg, name, "fp32", device, steps, warmup)["tokens_per_s"])
        rows.append({"config": name, "device": str(device), "rounds": rounds,
                     "mtd_tokens_per_s": theirs, "raydiff_tokens_per_s": ours,
                     "mtd_median": statistics.median(theirs),
                     "raydiff_median": statistics.median(ours),
                     "ratio": statistics.median(ours) / statistics.median(theirs)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["smoke", "tune/ablation-small", "reuters"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--force-bf16", action="store_true")
    parser.add_argument("--compile", default=None, help="also time train.compile=<mode>")
    parser.add_argument("--anchor", type=Path, default=None,
                        help="minimal-text-diffusion checkout: time its step beside ours")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --steps per variant")
    parser.add_argument("--floor", action="store_true",
                        help="CPU: also time the step's matmuls, attention and update alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    header = {"device": str(device), "machine": platform.processor() or platform.machine(),
              "cuda_device": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "threads": torch.get_num_threads(), "torch": torch.__version__}

    if args.anchor is not None:
        rows = side_by_side(args.anchor.resolve(), args.configs, device, args.rounds,
                            args.steps, args.warmup)
        print(json.dumps(header | {"side_by_side": rows}, indent=2))
        return

    peak = {"fp32": matmul_flops(torch.float32, device), "bf16": None}
    bf16_native = native_bf16(device)
    if bf16_native or args.force_bf16 or device.type == "cpu":
        peak["bf16"] = matmul_flops(torch.bfloat16, device, n=2048 if bf16_native else 256,
                                    seconds=1.0)
    results = []
    for name in args.configs:
        base = load_config(ROOT / "configs" / f"{name}.yaml")
        for precision in args.precisions:
            if precision == "bf16" and not (bf16_native or args.force_bf16):
                results.append({"config": name, "precision": "bf16", "skipped":
                                "no native bf16 on this device (see matmul_flops.bf16)"})
                continue
            # the first row is the plain step: BertEncoder, materialised logits and every
            # diagnostic on every step, as before session 8; the variants alternate by round
            variants = [("off", True, True, False), ("off", True, False, False),
                        ("off", True, False, True), ("off", False, False, True)] + (
                [(args.compile, False, False, True)] if args.compile else [])
            engines = [Timed(apply_overrides(base, {"train.compile": mode}), name, precision,
                             device, args.warmup, diagnostics, bert, chunked)
                       for mode, diagnostics, bert, chunked in variants]
            for _ in range(args.rounds):
                for engine in engines:
                    engine.time(args.steps)
            timed = [engine.row() for engine in engines]
            if args.floor and device.type == "cpu":
                floor = step_floor(engines[3])  # the eager step between reports
                floor["sum_s"] = floor["matmul_s"] + floor["attention_s"] + floor["update_s"]
                floor["half_plain_step_s"] = timed[0]["step_s"] / 2  # the 2x target
                timed[3]["floor"] = floor
            del engines
            for r in timed:  # model FLOPs: the plain step's count
                r["mfu"] = (timed[0]["flops_per_step"] / r["step_s"] / peak[precision]
                            if peak[precision] else None)
                r["speedup_vs_eager"] = timed[0]["step_s"] / r["step_s"]
                # paired by round (the variants of one round ran back to back): steadier than
                # the ratio of medians on a shared host whose speed drifts within minutes
                pairs = zip(timed[0]["round_step_s"], r["round_step_s"], strict=True)
                r["paired_speedup"] = statistics.median(plain / s for plain, s in pairs)
            results.extend(timed)
    print(json.dumps(header | {"native_bf16": bf16_native, "matmul_flops": peak,
                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
