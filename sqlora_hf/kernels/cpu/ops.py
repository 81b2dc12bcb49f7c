"""`torch.ops.sqlora_cpu.linear`: the C kernel as a torch custom op, with a fake (meta) impl.

The fake impl only computes the output shape, so `torch.compile` and meta-device tracing see the op
without running it. The real impl validates every buffer length in Python before handing raw
pointers to C (which re-checks them): a short or corrupt buffer raises, it is never read past.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Optional

import torch

from . import library

_LIB = torch.library.Library("sqlora_cpu", "DEF")
_LIB.define(
    "linear(Tensor x, Tensor codes, Tensor scales, Tensor? mask, Tensor lut, Tensor? lowrank_l, "
    "Tensor? lowrank_r, Tensor? bias, int out_features, int bits, int group_size, int sparsity) -> Tensor"
)

ERRORS = {-1: "invalid argument", -2: "buffer length does not match the layer's shape",
          -3: "instruction set not supported", -4: "out of memory"}


def num_threads() -> int:
    """`SQLORA_CPU_THREADS` when set, else torch's intra-op thread count."""
    env = os.environ.get("SQLORA_CPU_THREADS")
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"SQLORA_CPU_THREADS must be a positive integer, got {env!r}")
        return n
    return max(1, torch.get_num_threads())


def act_flags() -> int:
    """`SQLORA_CPU_INT_ACT`: the opt-in integer-activation batch-1 paths for 4-bit dense layers (not exact;
    docs/kernels_cpu.md). `0` (default): exact fp32. `1` or `12`: x as 12-bit integers per 64 columns and
    14-bit table values (x86 only; perplexity cost nil on SmolLM2). `8`: x as int8 per 32 columns and
    int8 table levels, multiplied with vpmaddubsw on x86 and sdot on aarch64 dotprod CPUs (the fastest;
    +1.15 % perplexity on SmolLM2, docs/kernels_cpu.md). Other ISAs and cases keep the exact path."""
    env = os.environ.get("SQLORA_CPU_INT_ACT")
    if not env or env == "0":
        return 0
    if env in ("1", "12"):
        return 1
    if env == "8":
        return 2
    raise ValueError(f"SQLORA_CPU_INT_ACT must be 0, 1 (= 12) or 8, got {env!r}")


FLAG_BF16_X = 4  # sqlora_cpu.c SQ_FLAG_BF16_X: x holds bfloat16 values (the exact vdpbf16ps kernel may run)
FLAG_EXACT = 8  # SQ_FLAG_EXACT: fp32 x keeps fp32 arithmetic (no two-term bf16 split)


def exact_flag() -> int:
    """`SQLORA_CPU_EXACT=1`: fp32 inputs keep exact fp32 arithmetic at every batch size. By default, on
    AVX-512 BF16 CPUs, 4-bit dense layers with a bf16 table split x into two bf16 terms (hi + lo) for the
    vdpbf16ps kernels at batches of 1-2 and of 7 to SQLORA_CPU_GEMM_MIN_ROWS - 1 rows: up to 1.2-1.6x
    faster, ~2.5e-6 relative error instead of ~1e-7 (docs/kernels_cpu.md). Batches of 3-6 rows take the
    exact kernel, which is no slower there; larger batches use the fp32 BLAS tiles either way."""
    env = os.environ.get("SQLORA_CPU_EXACT")
    if not env or env == "0":
        return 0
    if env == "1":
        return FLAG_EXACT
    raise ValueError(f"SQLORA_CPU_EXACT must be 0 or 1, got {env!r}")


# Large batches: torch's BLAS on dequantized row tiles. Our register-blocked kernel runs at a fixed
# ~60 GFLOPS per core, while the BLAS gets faster with the batch (docs/kernels_cpu.md "Large batches").
GEMM_MIN_ROWS = 32
_TILE_FLOATS = 1 << 20  # 4 MB of fp32 weights per tile, reused: the most a call ever holds dequantized
# One buffer per Python thread (the C call and torch.mm release the GIL); a thread that ran a large
# batch keeps its 4 MB for its lifetime.
_tile = threading.local()


def gemm_min_rows() -> int:
    """`SQLORA_CPU_GEMM_MIN_ROWS`: the batch (rows of x) from which a call multiplies dequantized row tiles
    with torch's BLAS instead of the packed kernel (default 32; 0: never). bf16 inputs of layers the
    vdpbf16ps kernel takes ignore it (that kernel is faster than the fp32 tiles at every batch size)."""
    env = os.environ.get("SQLORA_CPU_GEMM_MIN_ROWS")
    if not env:
        return GEMM_MIN_ROWS
    try:
        n = int(env)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"SQLORA_CPU_GEMM_MIN_ROWS must be a non-negative integer (0: never), got {env!r}")
    return n


_bf16_kernel: Optional[bool] = None


def bf16_kernel_available() -> bool:
    """Whether bf16 batches can take the vdpbf16ps kernel: an AVX-512 BF16 CPU with the AVX-512 path selected."""
    global _bf16_kernel
    if _bf16_kernel is None:
        lib = library.load()
        _bf16_kernel = bool(lib is not None and lib.sqlora_cpu_bf16_supported())
    return _bf16_kernel and library.selected_isa() == "avx512"


def _tile_buffer() -> torch.Tensor:
    buf = getattr(_tile, "buf", None)
    if buf is None:
        buf = _tile.buf = torch.empty(_TILE_FLOATS, dtype=torch.float32)
    return buf


def _run_tiled(lib, d: "Described", x: torch.Tensor, m: int) -> torch.Tensor:
    """y = x Wᵀ + bias + (x Rᵀ) Lᵀ with W dequantized a tile of rows at a time into this thread's 4 MB
    buffer (the same products of table value and scale as the kernels, summed by the BLAS). A nested
    call on the same thread (a dispatch mode running another layer inside torch.mm) gets a fresh tile.
    Autocast is off inside: the products are the kernel's, in fp32, whatever region the caller is in
    (under CPU autocast, F.linear would round the tile to bf16 and the fp32 low-rank term would not mix)."""
    nested = getattr(_tile, "busy", False)
    buf = torch.empty(_TILE_FLOATS, dtype=torch.float32) if nested else _tile_buffer()
    _tile.busy = True
    try:
        with torch.autocast("cpu", enabled=False):
            return _multiply_tiles(lib, d, x, m, buf)
    finally:
        _tile.busy = nested


def dequantize_rows(d: "Described", start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` of a described layer's Ŵ as a new fp32 tensor (C decoders, checked lengths)."""
    if not 0 <= start < stop <= d.n:
        raise ValueError(f"sqlora_cpu.dequantize_rows: rows {start}:{stop} outside 0:{d.n}")
    return _dequantize_into(library.load(), d, start, stop, torch.empty((stop - start, d.k), dtype=torch.float32))


def _dequantize_into(lib, d: "Described", start: int, stop: int, w: torch.Tensor) -> torch.Tensor:
    """Rows `start:stop` of Ŵ written into the contiguous fp32 `w [stop - start, K]`, which is returned."""
    rc = lib.sqlora_cpu_dequantize_rows_desc(d.addr, library.ISA_CODES[library.selected_isa()], num_threads(),
                                             start, stop, w.data_ptr())
    if rc != 0:
        raise RuntimeError(f"sqlora_cpu.dequantize failed: {ERRORS.get(rc, rc)} (code {rc})")
    return w


def _multiply_tiles(lib, d: "Described", x: torch.Tensor, m: int, buf: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(m, d.k)
    lowrank_l, lowrank_r, bias = d.tensors[4], d.tensors[5], d.tensors[6]
    rows = max(1, min(d.n, _TILE_FLOATS // d.k))

    def tile(n0: int, n1: int) -> torch.Tensor:
        return _dequantize_into(lib, d, n0, n1, buf[: (n1 - n0) * d.k].view(n1 - n0, d.k))

    if rows >= d.n:  # the whole layer in one tile (every layer of a small model): y = x Wᵀ + b directly
        y = torch.nn.functional.linear(x2, tile(0, d.n), bias)
    else:  # tile by tile into yᵀ, whose rows for a tile are contiguous
        yt = torch.empty((d.n, m), dtype=torch.float32)
        xt = x2.t()
        for n0 in range(0, d.n, rows):
            n1 = min(d.n, n0 + rows)
            torch.mm(tile(n0, n1), xt, out=yt[n0:n1])
        y = yt.t().contiguous()
        if bias is not None:
            y += bias
    if lowrank_l is not None:
        y.addmm_(x2 @ lowrank_r.t(), lowrank_l.t())
    return y.reshape(*x.shape[:-1], d.n)


def _row_bytes(n_stored: int, bits: int) -> int:
    return n_stored if bits == 8 else n_stored // 32 * 4 * bits


def _check(name: str, t: Optional[torch.Tensor], dtype: torch.dtype, numel: int) -> None:
    if t is None:
        raise ValueError(f"sqlora_cpu.linear: {name} is missing")
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"sqlora_cpu.linear: {name} must be a contiguous CPU {dtype} tensor, got {t.dtype} on {t.device}")
    if t.numel() != numel:
        raise ValueError(f"sqlora_cpu.linear: {name} has {t.numel()} elements, the layer's shape needs {numel}")


class Described:
    """A layer's validated constant arguments packed for `sqlora_cpu_linear_desc` (built once).

    Holds references to every tensor whose address is in `desc`, so the pointers stay valid as long
    as this object lives (it is kept in the module's kernel cache).
    """

    __slots__ = ("desc", "addr", "tensors", "n", "k", "bf16_table")

    def __init__(self, desc, tensors, n: int, k: int, bf16_table: bool = False) -> None:
        self.desc, self.tensors, self.n, self.k = desc, tensors, n, k
        self.addr = ctypes.addressof(desc)
        self.bf16_table = bf16_table  # a dense 4-bit layer whose table is bf16-exact (format 2)


def describe(codes, scales, mask, lut, lowrank_l, lowrank_r, bias, out_features: int, in_features: int,
             bits: int, group_size: int, sparsity: int) -> Described:
    """Validate every buffer of a layer against its shape (dtype, device, contiguity, element count)."""
    if bits not in (2, 3, 4, 8) or sparsity not in (0, 1, 2):
        raise ValueError(f"sqlora_cpu.linear: bits must be 2/3/4/8 and sparsity 0/1/2, got {bits}, {sparsity}")
    n, k = out_features, in_features
    if group_size not in (32, 64, 128, 256) or (sparsity and group_size == 32):
        raise ValueError(f"sqlora_cpu.linear: group_size must be 32, 64, 128 or 256 (64-256 when sparse), "
                         f"got {group_size}")
    if k % group_size:
        raise ValueError(f"sqlora_cpu.linear: group_size {group_size} does not divide in_features {k}")
    n_stored = k // 2 if sparsity else k
    _check("codes", codes, torch.uint8, n * _row_bytes(n_stored, bits))
    _check("scales", scales, torch.float32, n * (k // group_size))
    if sparsity:
        _check("mask", mask, torch.uint8, n * (k // 8))
    else:
        mask = None
    if bits != 8:
        _check("lut", lut, torch.float32, 1 << bits)
    rank = 0 if lowrank_l is None else lowrank_l.numel() // n
    if rank:
        _check("lowrank_l", lowrank_l, torch.float32, n * rank)
        _check("lowrank_r", lowrank_r, torch.float32, rank * k)
    else:
        lowrank_l = lowrank_r = None
    if bias is not None:
        _check("bias", bias, torch.float32, n)

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    def numel(t):
        return 0 if t is None else t.numel()

    desc = (ctypes.c_int64 * 20)(
        n, k, bits, group_size, sparsity, ptr(codes), numel(codes), ptr(scales), numel(scales),
        ptr(mask), numel(mask), ptr(lut), numel(lut), ptr(lowrank_l), ptr(lowrank_r), rank,
        numel(lowrank_l), numel(lowrank_r), ptr(bias), numel(bias),
    )
    bf16_table = bits == 4 and not sparsity and not bool((lut.view(torch.int32) & 0xFFFF).any())
    return Described(desc, (codes, scales, mask, lut, lowrank_l, lowrank_r, bias), n, k, bf16_table)


def run(d: Described, x: torch.Tensor, bf16_x: bool = False) -> torch.Tensor:
    """`x [M, K]` fp32 contiguous CPU → `[M, N]` through a described layer (no per-buffer checks)."""
    if library.load() is None:
        raise RuntimeError(f"sqlora CPU kernels are not available: {library.load_error()}")
    if x.dim() != 2 or x.shape[1] != d.k:
        raise ValueError(f"sqlora_cpu.linear: x must be 2-D [M, {d.k}], got {tuple(x.shape)}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"sqlora_cpu.linear: x must be a contiguous CPU float32 tensor, got {x.dtype} on {x.device}")
    return run_flat(d, x, bf16_x)


def run_flat(d: Described, x: torch.Tensor, bf16_x: bool = False) -> torch.Tensor:
    """`run` for a contiguous fp32 CPU `x [..., K]` (checked by the caller) → `[..., N]`, no reshapes.
    `bf16_x`: every value of x is a bfloat16 (it came from a bf16 tensor), which lets 4-bit layers with a
    bf16-exact table take the exact `vdpbf16ps` kernel at small batches (docs/kernels_cpu.md)."""
    lib = library.load()
    m = x.numel() // d.k
    exact = exact_flag()
    if m > 1 and d.k <= _TILE_FLOATS:  # (decode, m = 1, skips the variable; a row wider than a tile keeps the kernel)
        big = gemm_min_rows()
        # bf16 batches of a layer the vdpbf16ps kernel takes stay on it at every size (1.7-2x faster than
        # the fp32 tiles). fp32 ones split into two bf16 terms do not: 1.1-1.2x faster than the tiles at
        # 4096 x 4096, but slower on small layers (a 256-token SmolLM2 prompt: 0.90x against 1.01x).
        bf16_kernel = m > 2 and bf16_x and d.bf16_table and bf16_kernel_available()
        if big and m >= big and not bf16_kernel:
            return _run_tiled(lib, d, x, m)
    y = torch.empty((*x.shape[:-1], d.n), dtype=torch.float32)
    if m == 0:
        return y
    flags = act_flags() | exact | (FLAG_BF16_X if bf16_x else 0)
    rc = lib.sqlora_cpu_linear_desc(d.addr, library.ISA_CODES[library.selected_isa()], flags, num_threads(),
                                    x.data_ptr(), m, y.data_ptr())
    if rc != 0:
        raise RuntimeError(f"sqlora_cpu.linear failed: {ERRORS.get(rc, rc)} (code {rc})")
    return y


@torch.library.impl(_LIB, "linear", "CPU")
def _linear_cpu(x, codes, scales, mask, lut, lowrank_l, lowrank_r, bias, out_features, bits, group_size, sparsity):
    if library.load() is None:
        raise RuntimeError(f"sqlora CPU kernels are not available: {library.load_error()}")
    if x.dim() != 2:
        raise ValueError(f"sqlora_cpu.linear: x must be 2-D [M, K], got {tuple(x.shape)}")
    d = describe(codes, scales, mask, lut, lowrank_l, lowrank_r, bias, out_features, x.shape[1], bits, group_size,
                 sparsity)
    _check("x", x.contiguous(), torch.float32, x.numel())
    return run(d, x.contiguous())


@torch.library.register_fake("sqlora_cpu::linear", lib=_LIB)
def _linear_fake(x, codes, scales, mask, lut, lowrank_l, lowrank_r, bias, out_features, bits, group_size, sparsity):
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)
