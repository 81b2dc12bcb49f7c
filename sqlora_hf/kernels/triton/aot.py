"""Ahead-of-time compilation of every kernel variant for a GPU architecture, without a GPU.

The interpreter checks numerics but not lowering (`tl.dot` shape/dtype rules, layouts, register
pressure); `triton.compile` for sm_80/sm_90 catches those on a CPU-only CI machine. Used by
`scripts/ci_gpu_compile.sh` (every variant) and the unit tests (a representative subset).

Run: `python -m sqlora_hf.kernels.triton.aot [--arch 80 90] [--quick]`.
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
KERNELS = ("gemv", "matmul")


@dataclass(frozen=True)
class Variant:
    kernel: str  # "gemv" or "matmul"
    bits: int
    sparse: bool
    activation: str  # "fp16", "bf16", "fp32"
    lowrank: bool = True
    bias: bool = True

    def label(self) -> str:
        sp = "sparse" if self.sparse else "dense"
        return f"{self.kernel}-b{self.bits}-{sp}-{self.activation}-lr{int(self.lowrank)}-bias{int(self.bias)}"


def variants(quick: bool = False) -> Iterator[Variant]:
    """Every (kernel, bits, sparsity, activation) variant; `quick` keeps fp16 only for non-4-bit."""
    for kernel, bits, sparse, act in itertools.product(KERNELS, BITS, SPARSITY, ACTIVATIONS):
        if quick and bits != 4 and act != "fp16":
            continue
        yield Variant(kernel, bits, sparse, act)


def compile_variant(v: Variant, arch: int, group_size: int = 64):
    """Compile one variant for `sm_<arch>`; returns the compiled kernel (has `.asm["cubin"]`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = kernel_module(interpret=False)
    fn = kern.packed_gemv_kernel if v.kernel == "gemv" else kern.packed_matmul_kernel
    ptrs = {"x_ptr": f"*{v.activation}", "codes_ptr": "*u8", "scales_ptr": "*fp16", "mask_ptr": "*u8",
            **({"select_ptr": "*u8"} if v.kernel == "gemv" else {}), "lut_ptr": "*fp32", "t_ptr": "*fp32", "l_ptr": "*fp16", "bias_ptr": f"*{v.activation}",
            "y_ptr": f"*{v.activation}"}
    if v.kernel == "gemv":
        ints = ["N", "n_stored", "row_bytes", "n_groups", "mask_bytes", "rank", "stride_xm", "stride_ym"]
    else:
        ints = ["M", "N", "K", "row_bytes", "n_groups", "mask_bytes", "rank", "stride_xm", "stride_ym"]
    constexprs = {"BITS": v.bits, "GROUP": group_size, "SPARSE": v.sparse, "HAS_LOWRANK": v.lowrank,
                  "HAS_BIAS": v.bias}
    if v.kernel == "gemv":
        constexprs.update(BLOCK_N=32, BLOCK_K=128, BLOCK_R=32)
    else:
        constexprs.update(DOT_FP32=v.activation == "fp32", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16)
    signature = {**ptrs, **{name: "i32" for name in ints}, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (80, 90, ...)")
    parser.add_argument("--quick", action="store_true", help="fp16 only except for 4-bit")
    args = parser.parse_args(argv)
    failures = 0
    count = 0
    for arch in args.arch:
        for v in variants(args.quick):
            count += 1
            try:
                compiled = compile_variant(v, arch)
                size = len(compiled.asm["cubin"])
                print(f"sm_{arch} {v.label():40s} ok  cubin {size} bytes")
            except Exception as error:  # report every failure, then fail the run
                failures += 1
                print(f"sm_{arch} {v.label():40s} FAILED: {type(error).__name__}: {error}", file=sys.stderr)
    print(f"{count - failures}/{count} variants compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
