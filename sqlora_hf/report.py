"""`report(model)`: what compression did to each layer, with exact byte counts."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .nn.linear import SQLoRALinear


def _unique_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, tied tensors counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def report(model: nn.Module) -> dict[str, Any]:
    """One entry per compressed layer plus totals.

    `bits_per_weight` = 8 × (all bytes of the compressed layers: codes, scales, masks, factors,
    metadata) / (number of weights they replace). `total_bytes` is the whole model in memory:
    compressed layers plus everything left uncompressed (embeddings, norms, biases, head).
    """
    layers: dict[str, dict[str, Any]] = {}
    compressed_bytes = 0
    n_weights = 0
    for name, module in model.named_modules():
        if not isinstance(module, SQLoRALinear) or not module.is_packed:
            continue
        p = module.packed()
        nbytes = p.nbytes()
        weights = p.out_features * p.in_features
        layers[name] = {
            "shape": [p.out_features, p.in_features],
            "bits": p.bits,
            "group_size": p.group_size,
            "sparsity": p.sparsity,
            "rank": p.rank,
            "bytes": nbytes,
            "bits_per_weight": 8 * nbytes / weights,
        }
        compressed_bytes += nbytes
        n_weights += weights
    return {
        "layers": layers,
        "compressed_layers": len(layers),
        "compressed_weights": n_weights,
        "compressed_bytes": compressed_bytes,
        "bits_per_weight": 8 * compressed_bytes / n_weights if n_weights else 0.0,
        "total_bytes": _unique_bytes(model),
    }
