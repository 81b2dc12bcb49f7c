"""Ahead-of-time compilation of every kernel variant for a GPU architecture, without a GPU.

The interpreter checks numerics but not lowering (`tl.dot` shape/dtype rules, layouts, register
pressure); `triton.compile` for sm_80/sm_90 catches those on a CPU-only CI machine. Used by
`scripts/ci_gpu_compile.sh` (every variant) and the unit tests (a representative subset).

Run: `python -m sqlora_hf.kernels.triton.aot [--arch 80 90] [--quick] [--configs]`.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

from .launch import kernel_module

BITS = (2, 3, 4, 8)
SPARSITY = (False, True)
ACTIVATIONS = ("fp16", "bf16", "fp32")
# "gemv": the sparse GEMV (batch <= 8, sparse layers only); "matmul": the tile kernel with a
# large-batch tile (dense: BLOCK_K 64 < group 128, a group spans two K steps); "matmul16": the tile
# kernel with a small-batch tile (dense only: BLOCK_M 16, BLOCK_K 256 > group 64, four groups a step);
# "matmul1": the batch-1 row reduction (dense only: BLOCK_M 1, BLOCK_K 512).
KERNELS = ("gemv", "matmul1", "matmul16", "matmul")
TILES = {"matmul1": dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=512), "matmul16": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256),
         "matmul": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)}


@dataclass(frozen=True)
class Variant:
    kernel: str  # one of KERNELS
    bits: int
    sparse: bool
    activation: str  # "fp16", "bf16", "fp32"
    lowrank: bool = True
    bias: bool = True

    def label(self) -> str:
        sp = "sparse" if self.sparse else "dense"
        return f"{self.kernel}-b{self.bits}-{sp}-{self.activation}-lr{int(self.lowrank)}-bias{int(self.bias)}"


def variants(quick: bool = False) -> Iterator[Variant]:
    """Every (kernel, bits, sparsity, activation) variant the launcher can run; `quick` keeps fp16
    only for non-4-bit."""
    for kernel, bits, sparse, act in itertools.product(KERNELS, BITS, SPARSITY, ACTIVATIONS):
        if (kernel == "gemv" and not sparse) or (kernel in ("matmul1", "matmul16") and sparse):
            continue  # dense layers never take the GEMV; sparse ones never the small tiles
        if quick and bits != 4 and act != "fp16":
            continue
        yield Variant(kernel, bits, sparse, act)


def compile_variant(v: Variant, arch: int, group_size: Optional[int] = None, blocks: Optional[dict] = None,
                    num_warps: int = 4, num_stages: Optional[int] = None):
    """Compile one variant for `sm_<arch>`; returns the compiled kernel (has `.asm["cubin"]`).

    `group_size` and `blocks` (BLOCK_* constexprs) default to the variant's representative choice."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = kernel_module(interpret=False)
    gemv = v.kernel == "gemv"
    fn = kern.sparse_gemv_kernel if gemv else kern.packed_matmul_kernel
    ptrs = {"x_ptr": f"*{v.activation}", "codes_ptr": "*u8", "scales_ptr": "*fp16", "mask_ptr": "*u8",
            **({"select_ptr": "*u8"} if gemv else {}), "lut_ptr": "*fp32", "t_ptr": "*fp32",
            "l_ptr": "*fp16", "bias_ptr": f"*{v.activation}", "y_ptr": f"*{v.activation}"}
    if gemv:
        ints = ["N", "n_stored", "row_bytes", "n_groups", "mask_bytes", "rank", "stride_xm", "stride_ym"]
    else:
        ints = ["M", "N", "K", "row_bytes", "n_groups", "mask_bytes", "rank", "stride_xm", "stride_ym"]
    if group_size is None:
        group_size = 128 if v.kernel == "matmul" and not v.sparse else 64
    constexprs = {"BITS": v.bits, "GROUP": group_size, "HAS_LOWRANK": v.lowrank, "HAS_BIAS": v.bias}
    if gemv:
        constexprs.update(BLOCK_N=32, BLOCK_K=128, BLOCK_R=32)
    else:
        constexprs.update(SPARSE=v.sparse, DOT_FP32=v.activation == "fp32", **TILES[v.kernel], BLOCK_R=16)
    constexprs.update(blocks or {})
    signature = {**ptrs, **{name: "i32" for name in ints}, **{name: "constexpr" for name in constexprs}}
    # What a launch on a real layer specializes: 16-byte aligned tensors, and sizes, row lengths and
    # strides divisible by 16 (so byte and scale tiles compile to vector loads, as on the GPU).
    aligned = [*ptrs, *(name for name in ints if name not in ("M", "rank"))]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def tuning_configs() -> Iterator[tuple[Variant, dict, int, int]]:
    """(variant, blocks, num_warps, num_stages) for every dense autotune config of launch.py, 4-bit fp16."""
    from .launch import dense_configs

    for kernel, family in (("matmul1", "one"), ("matmul16", "small"), ("matmul", "large")):
        for bm, bn, bk, warps, stages in dense_configs(family):
            yield Variant(kernel, 4, False, "fp16"), dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps, stages


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (80, 90, ...)")
    parser.add_argument("--quick", action="store_true", help="fp16 only except for 4-bit")
    parser.add_argument("--configs", action="store_true",
                        help="also every dense autotune config of launch.py (4-bit, fp16)")
    args = parser.parse_args(argv)
    jobs = [(v, {}, 4, None) for v in variants(args.quick)]
    if args.configs:
        jobs += list(tuning_configs())
    failures = 0
    count = 0
    for arch in args.arch:
        for v, blocks, warps, stages in jobs:
            count += 1
            label = v.label() + "".join(f" {k[6:]}{val}" for k, val in blocks.items())
            try:
                compiled = compile_variant(v, arch, blocks=blocks, num_warps=warps, num_stages=stages)
                size = len(compiled.asm["cubin"])
                print(f"sm_{arch} {label:40s} ok  cubin {size} bytes")
            except Exception as error:  # report every failure, then fail the run
                failures += 1
                print(f"sm_{arch} {label:40s} FAILED: {type(error).__name__}: {error}", file=sys.stderr)
    print(f"{count - failures}/{count} variants compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
