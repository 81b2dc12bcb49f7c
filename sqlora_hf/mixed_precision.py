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
runs under autocast too (its Hessians in fp32): the sensitivities only rank candidates, and on SmolLM2
the bf16 pass changed 2 and 4 of 210 layer choices (near ties) at 4.25 and 3.25 bpw, 6-7 s sooner.

Sampling `calibration="self"` text is the other slow forward work, but there autocast does not pay:
each step multiplies only a few rows (32 windows) and autocast re-rounds every weight at every call,
so it was 0.88-0.93x the fp32 speed. `bf16_linear_copies` rounds each Linear's weight once and keeps
the copy for the whole loop: SmolLM2's 32 x 512 windows in 72 s instead of 92 s (1.5-1.7x over the
first 256 tokens; later the attention over the growing cache takes a larger share; docs/calibrated.md).
Attention stays fp32 there: torch's CPU attention over a bf16 cache at one query was 3.4x slower.

`SQLORA_CALIBRATION_BF16=0` keeps every forward in the model's own precision. CPUs without native
bf16 keep it too (emulated bf16 products are slower than fp32), and so do other devices.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.nn.functional as F

ENV = "SQLORA_CALIBRATION_BF16"


def cpu_has_native_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _bf16_worth_it(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get(ENV, "1") != "0" and cpu_has_native_bf16()


def forward_autocast(device: torch.device, dtype: torch.dtype = torch.float32) -> ContextManager:
    """Autocast to bfloat16 for a calibration forward (and backward) pass on `device`, when worth it.

    Only for float32 models: a bfloat16 model already runs in bf16, and a float16 one would mix dtypes
    (CPU autocast feeds bf16 activations to its fp16 LayerNorm parameters, which LayerNorm refuses)."""
    if dtype == torch.float32 and _bf16_worth_it(device):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _available_memory_bytes() -> int:
    """MemAvailable (page cache counts as free), as the one-pass calibration's own memory check reads it."""
    from .sequential import _available_bytes

    return _available_bytes()


def _bf16_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x -> F.linear(bf16(x), weight, bias)` in x's dtype, `weight` and `bias` already bf16.

    Where torch has oneDNN, the weight is reordered once into oneDNN's blocked layout for about `rows`
    rows: `F.linear` re-blocks it at every call, and for 32 rows that was 1.25-1.5x slower (SmolLM2's
    shapes, weights not in cache). The result must equal `F.linear`'s on a probe, else plain
    `F.linear` is used (the reordering ops are torch internals, so a version may lack or change them).
    """
    def plain(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)

    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

        def blocked(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "").to(x.dtype)

        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        return blocked if torch.equal(blocked(probe), plain(probe)) else plain
    except (AttributeError, RuntimeError):
        return plain


@contextlib.contextmanager
def bf16_linear_copies(model: torch.nn.Module, rows: int = 32) -> Iterator[bool]:
    """Inside: every fp32 `nn.Linear` of `model` on the CPU multiplies by a bfloat16 copy of its weight
    (inputs rounded to bf16, outputs returned in the input's dtype); on exit the model is as before.

    For many small forward passes (sampling), where `forward_autocast` would re-round the weights at
    every call. Only where `forward_autocast` would be used, and only if the copies (half the fp32
    Linear weights) take at most half the memory still free; yields whether the copies are in use.
    `rows`: about how many rows each product will have (the batch), for oneDNN's weight layout.
    """
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
               and m.weight.dtype == torch.float32 and _bf16_worth_it(m.weight.device)]  # (hooked ones left alone)
    needed = sum(m.weight.numel() * 2 for m in linears)
    if not linears or 2 * needed > _available_memory_bytes():
        yield False
        return
    patched = []
    try:
        for m in linears:
            bias = None if m.bias is None else m.bias.detach().to(torch.bfloat16)
            # an instance attribute shadows the class's forward until deleted
            m.forward = _bf16_linear(m.weight.detach().to(torch.bfloat16), bias, rows)
            patched.append(m)
        yield True
    finally:  # also when making a copy failed half-way: every patched Linear gets its own forward back
        for m in patched:
            del m.forward


def full_precision() -> ContextManager:
    """Inside a hook called from a `forward_autocast` region: compute in the tensors' own dtypes."""
    return torch.autocast("cpu", enabled=False)
