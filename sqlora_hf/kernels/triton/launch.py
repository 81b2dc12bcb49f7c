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

import numpy as np
import torch
import torch.nn.functional as F

from ...formats.codebooks import nf_table

KERNEL_SOURCE = Path(__file__).with_name("kernels.py")
# Dense layers all run the tile kernel: batch 1 with BLOCK_M = 1 (a row reduction), batches up to
# SMALL_BATCH with BLOCK_M = 16 and the small-batch tile shapes, larger ones the large-batch shapes.
# Sparse layers: batches up to GEMV_MAX_BATCH take the sparse GEMV kernel, larger ones the tile kernel.
SMALL_BATCH = 16
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
    if interpret:
        _fix_interpreter_scalar_index()
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


def _fix_interpreter_scalar_index() -> None:
    """Let Triton's interpreter turn a scalar kernel argument into an int with NumPy >= 2.4.

    The interpreter holds a scalar argument as a 1-element array; Triton 3.6 converts it with `int()`
    (for `range(0, K, BLOCK_K)`), which new NumPy refuses ("only 0-dimensional arrays can be
    converted to Python scalars"). Triton 3.9 squeezes the array first; this does the same on older
    versions. It only touches the interpreter, and only when NumPy needs it.
    """
    try:
        int(np.zeros(1, dtype=np.int32))
        return  # this NumPy still converts 1-element arrays
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_sqlora_scalar_index", False):
        return

    def scalar_index(self):
        return int(np.asarray(self.handle.data).reshape(-1)[0])

    def patch_lang_tensor(tensor, *rest):
        original(tensor, *rest)
        if rest and hasattr(rest[0], "set_attr"):  # Triton >= 3.4: attributes restored after the launch
            rest[0].set_attr(tensor, "__index__", scalar_index)
        else:
            tensor.__index__ = scalar_index

    patch_lang_tensor._sqlora_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _tuned(kernel, configs: list, key: list[str]):
    """`kernel` wrapped in Triton's autotuner (GPU only): the first call per key times every config
    and keeps the fastest. No GPU was available to pick fixed tile sizes, so the GPU picks them."""
    import triton

    return triton.autotune(configs=configs, key=key)(kernel)


# Autotuning candidates: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Dense layers only take
# power-of-two BLOCK_K >= 32 (any such BLOCK_K and group size divide one another), and num_warps <=
# BLOCK_N: with more warps than rows, Triton 3.6 spreads the codebook gather across warps and its
# compiler aborts (`OptimizeThreadLocality`: "isWarpLocal" assertion; seen with BLOCK_N 8, 8 warps).
# Batch 1: a row reduction (no tl.dot), few rows and long K steps per program. On an H100 (4096x4096,
# 4-bit, Triton 3.6) BLOCK_N 8 with BLOCK_K 512-1024 and one stage were the fastest of those tried.
DENSE_ONE_CONFIGS = [(1, 8, 1024, 4, 1), (1, 8, 512, 4, 1), (1, 16, 1024, 4, 1), (1, 16, 512, 4, 1),
                     (1, 32, 512, 8, 1), (1, 16, 512, 4, 2)]
# Batch 2-16: tl.dot on a 16-row tile (rows past the batch masked); the kernel is bound by the weight
# bytes, so small BLOCK_N and long K steps give a 4096-row layer 64-256 programs for 132 SMs.
DENSE_SMALL_CONFIGS = [(16, 16, 256, 4, 3), (16, 32, 128, 4, 3), (16, 16, 512, 4, 2), (16, 32, 256, 4, 3),
                       (16, 16, 128, 4, 3), (16, 32, 512, 8, 2), (16, 64, 128, 4, 3)]
# Larger batches: tensor-core tiles.
DENSE_LARGE_CONFIGS = [(128, 64, 128, 8, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (64, 64, 128, 4, 3),
                       (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 128, 8, 2)]
# Sparse (per-weight decode): (BLOCK_N, BLOCK_K, num_warps[, num_stages]); BLOCK_M comes from the batch.
SPARSE_GEMV_CONFIGS = [(8, 256, 4), (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8)]
SPARSE_MATMUL_CONFIGS = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4),
                         (128, 128, 8, 2)]
DENSE_CONFIGS = {"one": DENSE_ONE_CONFIGS, "small": DENSE_SMALL_CONFIGS, "large": DENSE_LARGE_CONFIGS}


def dense_configs(family: str) -> list[tuple[int, int, int, int, int]]:
    """The dense autotune candidates of `family` ("one", "small", "large") that Triton can compile
    (num_warps <= BLOCK_N, see above); the AOT compile check uses the same list."""
    return [c for c in DENSE_CONFIGS[family] if c[3] <= c[1]]
# Blocks used under the interpreter (few programs: each costs tens of ms there) and as defaults.
INTERPRETER_BLOCKS = {
    "one": dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=128),
    "small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),
    "large": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
    "sparse_gemv": dict(BLOCK_N=64, BLOCK_K=128),
    "sparse_matmul": dict(BLOCK_N=64, BLOCK_K=64),
}


def gpu_kernel(kind: str):
    """The compiled kernel for `kind`, autotuned over the tile shapes above (built once per process).

    Kinds: "one", "small" and "large-<bucket>" (dense layers at batch 1, 2-16, and larger batches,
    one tuner per batch bucket so batch 32 and batch 4096 each keep their own choice), "sparse_gemv",
    "sparse_matmul" (its key includes BLOCK_M, which the launcher picks from the batch).
    """
    with _lock:
        tuned = _modules.setdefault("tuned", {})
        kernel = tuned.get(kind)
    if kernel is None:
        import triton

        kern = kernel_module(interpret=False)
        family = kind.split("-")[0]  # "large-<bucket>" tunes the "large" list
        if family in DENSE_CONFIGS:
            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                       for bm, bn, bk, w, st in dense_configs(family)]
            kernel = _tuned(kern.packed_matmul_kernel, configs, ["N", "K", "BITS", "GROUP", "DOT_FP32"])
        elif kind == "sparse_gemv":
            configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                       for bn, bk, w in SPARSE_GEMV_CONFIGS]
            kernel = _tuned(kern.sparse_gemv_kernel, configs, ["N", "n_stored", "BITS", "GROUP"])
        elif kind == "sparse_matmul":
            configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                       for bn, bk, w, st in SPARSE_MATMUL_CONFIGS]
            kernel = _tuned(kern.packed_matmul_kernel, configs, ["N", "K", "BITS", "GROUP", "DOT_FP32", "BLOCK_M"])
        else:
            raise ValueError(f"unknown kernel kind {kind!r}")
        with _lock:
            kernel = _modules["tuned"].setdefault(kind, kernel)
    return kernel


@dataclass
class PreparedLayer:
    """Device-side constants of one layer, built once and kept in `module.kernel_cache("triton")`.

    The packed tensors are used as stored (the kernels read the canonical format); only small
    tables are added: the codebook (fp32, padded to 16 entries), the 4:8/2:4 select table, and an
    fp32 copy of `R` (for the one `t = x·Rᵀ` product per call).
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
        lut = torch.zeros(16, device=device)  # the NF codebook padded to 16 entries (none for int8)
        if bits != 8:
            lut[: 1 << bits] = nf_table(bits, torch.float32, device, packed.codebook)
        sparse = packed.sparsity is not None
        select = select_table(device) if sparse else torch.zeros(1, dtype=torch.uint8, device=device)
        r_fp32 = packed.lowrank_r.to(torch.float32).contiguous() if packed.rank > 0 else None
        prepared = PreparedLayer(bits, packed.group_size, sparse, packed.out_features, packed.in_features,
                                 packed.n_stored, packed.rank, lut.contiguous(), select, r_fp32)
        cache["prepared"] = prepared
    return prepared


def packed_linear(module, x: torch.Tensor, interpret: bool, blocks: Optional[dict] = None) -> torch.Tensor:
    """`x [M, K]` (fp16/bf16/fp32) → `[M, N]` in x's dtype, low-rank term and bias included.

    `blocks` fixes the meta-parameters (`BLOCK_M`/`BLOCK_N`/`BLOCK_K`, and `num_warps`/`num_stages`
    on a GPU) instead of the interpreter defaults or the autotuner: for tests and benchmarks. Dense
    layers need `BLOCK_K` a power of two >= 32 (`BLOCK_K` and the group size then always divide one
    another); `BLOCK_M` is 1 (no `tl.dot`) or >= 16, and then `BLOCK_N` >= 16; `num_warps` <= `BLOCK_N`.
    """
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
    flags = dict(BITS=p.bits, GROUP=p.group_size, HAS_LOWRANK=p.rank > 0, HAS_BIAS=module.bias is not None)
    tail = (p.rank, x.stride(0), y.stride(0))
    fixed = {}  # meta-parameters the launcher fixes (not tuned)
    if p.sparse and m <= GEMV_MAX_BATCH:
        kind, name = "sparse_gemv", "sparse_gemv_kernel"
        args = (x, codes, scales, mask, p.select, p.lut, t, l_factor, bias, y,
                p.n, p.n_stored, codes.shape[1], scales.shape[1], p.k // 8, *tail)
        flags.update(BLOCK_R=32)
        grid = lambda meta: (triton_cdiv(p.n, meta["BLOCK_N"]), m)  # noqa: E731
    else:
        name = "packed_matmul_kernel"
        args = (x, codes, scales, mask, p.lut, t, l_factor, bias, y,
                m, p.n, p.k, codes.shape[1], scales.shape[1], p.k // 8, *tail)
        # bf16 `tl.dot` is wrong in Triton's interpreter; there the dot runs in fp32 on bf16-rounded tiles.
        dot_fp32 = x.dtype == torch.float32 or (interpret and x.dtype == torch.bfloat16)
        flags.update(SPARSE=p.sparse, DOT_FP32=dot_fp32, BLOCK_R=16)
        if p.sparse:
            kind = "sparse_matmul"
            fixed = dict(BLOCK_M=16 if m <= 16 else (32 if m <= 32 else 64))
        elif m == 1:
            kind = "one"
        elif m <= SMALL_BATCH:
            kind = "small"
        else:
            kind = "large"
        grid = lambda meta: (triton_cdiv(m, meta["BLOCK_M"]), triton_cdiv(p.n, meta["BLOCK_N"]))  # noqa: E731
    if interpret or blocks:
        meta = {**INTERPRETER_BLOCKS[kind], **fixed, **(blocks or {})}
        kernel = getattr(kernel_module(interpret), name)
        kernel[grid({**flags, **meta})](*args, **flags, **meta)
    else:
        if kind == "large":  # one tuning per batch bucket (32, 64, 128, 256+)
            kind = f"large-{min(1 << (m - 1).bit_length(), 256)}"
        gpu_kernel(kind)[grid](*args, **flags, **fixed)
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
