"""The reference backend: dequantize to a dense matrix, then `F.linear`. Slow, exact, the oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_backend


class ReferenceBackend:
    name = "reference"

    def is_available(self) -> bool:
        return True

    def supports(self, module, x: torch.Tensor) -> bool:
        return True

    def linear(self, module, x: torch.Tensor) -> torch.Tensor:
        packed = module.packed()
        dtype = x.dtype
        w = packed.dequantize_quantized(dtype)
        y = F.linear(x, w)
        if packed.rank > 0:
            y = y + F.linear(F.linear(x, packed.lowrank_r.to(dtype)), packed.lowrank_l.to(dtype))
        if module.bias is not None:
            y = y + module.bias.to(dtype)
        return y


register_backend(ReferenceBackend())
