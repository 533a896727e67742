"""Mixed-precision policy: bf16 where the hardware computes it natively, else fp16 with loss
scaling on GPUs, else fp32. Measured on this project's 2-core AVX2 CI machine: fp32 matmul
~155 GFLOP/s, bf16 0.3 GFLOP/s (emulated), so `auto` must not pick bf16 merely because
autocast accepts it.
"""

from __future__ import annotations

import contextlib

import torch

from raydiff.errors import RaydiffError


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (Ampere+ GPUs, AVX512-BF16/AMX CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> the fastest exact-enough choice for this device; explicit choices are kept."""
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise RaydiffError("train.precision=fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
        return requested
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def group_precision(choices: list[str]) -> str:
    """One precision for a whole DDP group from each worker's own choice, so that gradients
    enter the all-reduce on one scale: bf16 only if every worker chose bf16; fp16 (with loss
    scaling, the same initial scale everywhere) if every worker has a GPU but some lack bf16
    (e.g. A100s with T4s); fp32 as soon as one worker is on a CPU."""
    if "fp32" in choices:
        return "fp32"
    return "bf16" if all(c == "bf16" for c in choices) else "fp16"
