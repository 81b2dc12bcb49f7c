"""The "cpu" backend: packed C kernels (AVX-512 / AVX2 / scalar on x86, NEON on aarch64).

Load-time preparation (cached per module with `kernel_cache("cpu")`): fp16 scales and low-rank
factors become fp32 once, so the kernel's inner loop never converts halves. Codes and masks are used
in the canonical format as stored (docs/format.md); no repacking is needed for these kernels.
"""
from __future__ import annotations

import torch

from .. import register_backend
from ...formats.codebooks import nf_table
from . import library, ops  # noqa: F401  (ops registers torch.ops.sqlora_cpu.linear)

_SPARSITY_CODE = {None: 0, "2:4": 1, "4:8": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def prepared(module) -> dict:
    """The fp32 tensors the kernel reads, built once per module and kept in its kernel cache."""
    cache = module.kernel_cache("cpu")
    if not cache:
        p = module.packed()
        p.validate("layer", check_values=False)  # shapes and dtypes against qmeta: no short buffers
        cache["codes"] = p.qcodes.contiguous()
        cache["scales"] = p.qscales.to(torch.float32).contiguous()
        cache["mask"] = None if p.qmask is None else p.qmask.contiguous()
        cache["lut"] = nf_table(p.bits) if p.bits != 8 else torch.zeros(1)
        cache["L"] = None if p.rank == 0 else p.lowrank_l.to(torch.float32).contiguous()
        cache["R"] = None if p.rank == 0 else p.lowrank_r.to(torch.float32).contiguous()
        cache["meta"] = (p.out_features, p.bits, p.group_size, _SPARSITY_CODE[p.sparsity])
    return cache


class CPUBackend:
    name = "cpu"

    def is_available(self) -> bool:
        return library.load() is not None

    def supports(self, module, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in _DTYPES and module.qcodes is not None and module.qcodes.device.type == "cpu"

    def linear(self, module, x: torch.Tensor) -> torch.Tensor:
        c = prepared(module)
        n, bits, group, sparsity = c["meta"]
        bias = None if module.bias is None else module.bias.detach().to(torch.float32).contiguous()
        y = torch.ops.sqlora_cpu.linear(
            x.to(torch.float32).contiguous(), c["codes"], c["scales"], c["mask"], c["lut"], c["L"], c["R"],
            bias, n, bits, group, sparsity,
        )
        return y.to(x.dtype)


register_backend(CPUBackend())
