"""bfloat16 matrix products for the forward passes of calibrated compression, where the CPU has them.

Why: calibrated compression spends much of its time pushing every calibration token through the
blocks. On a CPU with native bfloat16 dot products (AVX-512 BF16 or AMX) torch's bf16 matrix products
are 2-2.5x faster than fp32 at these shapes (SmolLM2's Linears over 16k tokens, 2 threads). The
block passes only produce the *inputs* the algorithms measure: activations rounded to 8 mantissa
bits differ from fp32 by ~0.4 %, far below the 3- and 4-bit quantization error being fitted; on
SmolLM2 perplexity moved by less than the spread between two sampled calibration sets (+1.1 % with one
set, -0.1 % with another, 0.0 % at 4.25 bpw; docs/calibrated.md). Everything that decides a weight
(Gram matrices, GPTQ, the low-rank fits, the targets) runs in fp32 inside `full_precision()`: the
hooks that do that work are called from inside the autocast region. The planner's loss-gradient pass
is not wrapped (fp32).

`SQLORA_CALIBRATION_BF16=0` keeps every forward in the model's own precision. CPUs without native
bf16 keep it too (emulated bf16 products are slower than fp32), and so do other devices.
"""
from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch

ENV = "SQLORA_CALIBRATION_BF16"


def cpu_has_native_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def forward_autocast(device: torch.device) -> ContextManager:
    """Autocast to bfloat16 for a calibration forward (and backward) pass on `device`, when worth it."""
    if device.type == "cpu" and os.environ.get(ENV, "1") != "0" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision() -> ContextManager:
    """Inside a hook called from a `forward_autocast` region: compute in the tensors' own dtypes."""
    return torch.autocast("cpu", enabled=False)
