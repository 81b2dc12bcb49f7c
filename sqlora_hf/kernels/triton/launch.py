"""Python side of the Triton kernels: pick a kernel and tile sizes, build the arguments, launch.

Triton decides at *decoration* time whether `@triton.jit` compiles for the GPU or runs in its CPU
interpreter (`TRITON_INTERPRET`). A test or user may set the variable after `sqlora_hf` was imported,
and a process may want both, so the kernel source (`kernels.py`) is loaded twice on demand: once as
compiled kernels for CUDA tensors and once as interpreted kernels for CPU tensors. Both copies come
from the same file, so the interpreter checks exactly the code the GPU runs.
"""
from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F

from ...formats.codebooks import nf_table

KERNEL_SOURCE = Path(__file__).with_name("kernels.py")
# Batches up to this size take the GEMV kernel; larger ones the tensor-core tile kernel.
GEMV_MAX_BATCH = 8
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_modules: dict = {}  # True/False: interpreted/compiled kernels.py; "tuned": autotuned GPU kernels
_lock = threading.Lock()


def interpreter_enabled() -> bool:
    """True when the user asked for Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernel_module(interpret: bool) -> ModuleType:
    """`kernels.py` decorated for the interpreter (`interpret=True`) or for GPU compilation."""
    with _lock:
        module = _modules.get(interpret)
        if module is None:
            module = _load_kernel_source(interpret)
            _modules[interpret] = module
        return module


def _load_kernel_source(interpret: bool) -> ModuleType:
    name = f"sqlora_hf.kernels.triton._kernels_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, KERNEL_SOURCE)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def _tuned(kernel, configs: list, key: list[str]):
    """`kernel` wrapped in Triton's autotuner (GPU only): the first call per key times every config
    and keeps the fastest. No GPU was available to pick fixed tile sizes, so the GPU picks them."""
    import triton

    return triton.autotune(configs=configs, key=key)(kernel)


def gpu_kernels() -> dict:
    """The compiled kernels, autotuned over a few tile shapes (loaded once per process)."""
    with _lock:
        tuned = _modules.get("tuned")
    if tuned is None:
        import triton

        kern = kernel_module(interpret=False)
        gemv_configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                        for bn, bk, w in [(8, 256, 4), (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 8),
                                          (64, 128, 8)]]
        matmul_configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                          for bn, bk, w, st in [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3),
                                                (64, 64, 4, 4), (128, 128, 8, 2)]]
        tuned = {
            "gemv": _tuned(kern.packed_gemv_kernel, gemv_configs, ["N", "n_stored", "BITS", "SPARSE"]),
            "matmul": _tuned(kern.packed_matmul_kernel, matmul_configs, ["N", "K", "BITS", "SPARSE", "BLOCK_M"]),
        }
        with _lock:
            _modules["tuned"] = tuned
    return tuned


@dataclass
class PreparedLayer:
    """Device-side constants of one layer, built once and kept in `module.kernel_cache("triton")`.

    The packed tensors are used as stored (the kernels read the canonical format); only small
    tables are added: the codebook, the 4:8/2:4 select table, and an fp32 copy of `R` (for the one
    `t = x·Rᵀ` product per call).
    """

    bits: int
    group_size: int
    sparse: bool
    n: int
    k: int
    n_stored: int
    rank: int
    lut: torch.Tensor
    select: torch.Tensor
    r_fp32: Optional[torch.Tensor]


def select_table(device) -> torch.Tensor:
    """uint8 `[256·4]`: entry `byte·4 + i` is the bit position of the i-th set bit of `byte`.

    Every mask byte of a valid 2:4 or 4:8 layer has exactly four set bits (docs/format.md), so four
    entries per byte suffice; the GEMV kernel decodes the bitmap with one lookup per weight.
    """
    table = torch.zeros(256, 4, dtype=torch.uint8)
    for byte in range(256):
        positions = [bit for bit in range(8) if byte >> bit & 1][:4]
        table[byte, : len(positions)] = torch.tensor(positions, dtype=torch.uint8)
    return table.reshape(-1).to(device)


def prepare(module) -> PreparedLayer:
    cache = module.kernel_cache("triton")
    prepared = cache.get("prepared")
    if prepared is None:
        packed = module.packed()
        device = packed.qcodes.device
        bits = packed.bits
        lut = nf_table(bits, torch.float32, device) if bits != 8 else torch.zeros(1, device=device)
        sparse = packed.sparsity is not None
        select = select_table(device) if sparse else torch.zeros(1, dtype=torch.uint8, device=device)
        r_fp32 = packed.lowrank_r.to(torch.float32).contiguous() if packed.rank > 0 else None
        prepared = PreparedLayer(bits, packed.group_size, sparse, packed.out_features, packed.in_features,
                                 packed.n_stored, packed.rank, lut.contiguous(), select, r_fp32)
        cache["prepared"] = prepared
    return prepared


def packed_linear(module, x: torch.Tensor, interpret: bool) -> torch.Tensor:
    """`x [M, K]` (fp16/bf16/fp32) → `[M, N]` in x's dtype, low-rank term and bias included."""
    p = prepare(module)
    x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, p.n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    codes, scales = module.qcodes, module.qscales
    mask = module.qmask if p.sparse else codes  # unused pointer when dense
    if p.rank > 0:
        # t = x·Rᵀ once per call (one skinny GEMM), never once per program: recomputing it in every
        # program would multiply the reads of R by the number of programs.
        t = F.linear(x.to(torch.float32), p.r_fp32).contiguous()
        l_factor = module.lowrank_l
    else:
        t, l_factor = y, y  # unused pointers
    bias = module.bias if module.bias is not None else y
    flags = dict(BITS=p.bits, GROUP=p.group_size, SPARSE=p.sparse, HAS_LOWRANK=p.rank > 0,
                 HAS_BIAS=module.bias is not None)
    tail = (p.rank, x.stride(0), y.stride(0))
    if m <= GEMV_MAX_BATCH:
        args = (x, codes, scales, mask, p.select, p.lut, t, l_factor, bias, y,
                p.n, p.n_stored, codes.shape[1], scales.shape[1], p.k // 8, *tail)
        if interpret:
            kernel_module(True).packed_gemv_kernel[(triton_cdiv(p.n, 64), m)](
                *args, **flags, BLOCK_N=64, BLOCK_K=128, BLOCK_R=32)
        else:
            gpu_kernels()["gemv"][lambda meta: (triton_cdiv(p.n, meta["BLOCK_N"]), m)](*args, **flags, BLOCK_R=32)
    else:
        # bf16 `tl.dot` is wrong in Triton's interpreter; there the dot runs in fp32 on bf16-rounded tiles.
        dot_fp32 = x.dtype == torch.float32 or (interpret and x.dtype == torch.bfloat16)
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        args = (x, codes, scales, mask, p.lut, t, l_factor, bias, y,
                m, p.n, p.k, codes.shape[1], scales.shape[1], p.k // 8, *tail)
        if interpret:
            grid = (triton_cdiv(m, block_m), triton_cdiv(p.n, 64))
            kernel_module(True).packed_matmul_kernel[grid](*args, **flags, DOT_FP32=dot_fp32, BLOCK_M=block_m,
                                                           BLOCK_N=64, BLOCK_K=64, BLOCK_R=16)
        else:
            grid = lambda meta: (triton_cdiv(m, block_m), triton_cdiv(p.n, meta["BLOCK_N"]))  # noqa: E731
            gpu_kernels()["matmul"][grid](*args, **flags, DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_R=16)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
