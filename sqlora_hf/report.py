"""`report(model)`: what compression did to each layer, with exact byte counts."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .formats.codebooks import CODEBOOK_SKEW2
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


TIER_NAMES = {2: "NF2", 3: "NF3", 4: "NF4", 8: "int8"}


def _tier_name(bits: int, codebook: int) -> str:
    return "skew2" if codebook == CODEBOOK_SKEW2 else TIER_NAMES.get(bits, f"{bits}-bit")


def _layer_entry(module: SQLoRALinear) -> dict[str, Any]:
    p = module.packed()
    nbytes = p.nbytes()
    return {
        "shape": [p.out_features, p.in_features],
        "bits": p.bits,
        "group_size": p.group_size,
        "sparsity": p.sparsity,
        "rank": p.rank,
        "bytes": nbytes,
        "bits_per_weight": 8 * nbytes / (p.out_features * p.in_features),
        "tier": _tier_name(p.bits, p.codebook),
        # ||W − Ŵ − L·R||_F / ||W||_F measured at compression; None when unknown (a reloaded model).
        "relative_error": getattr(module, "relative_error", None),
    }


def report(model: nn.Module) -> dict[str, Any]:
    """One entry per compressed layer plus totals.

    `bits_per_weight` = 8 × (all bytes of the compressed layers: codes, scales, masks, factors,
    metadata) / (number of weights they replace). `total_bytes` is the whole model in memory:
    compressed layers plus everything left uncompressed (embeddings, norms, biases, head).
    A head packed by `SQLoRAConfig(head_bits=...)` is listed under `output_head`, not in `layers`
    or `bits_per_weight`, which describe the transformer's layers that `memory_budget` plans.
    """
    layers: dict[str, dict[str, Any]] = {}
    compressed_bytes = 0
    n_weights = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_head = None
    for name, module in model.named_modules():
        if not isinstance(module, SQLoRALinear) or not module.is_packed:
            continue
        entry = _layer_entry(module)
        if module is head:
            output_head = {"name": name, **entry}
            continue
        layers[name] = entry
        compressed_bytes += entry["bytes"]
        n_weights += entry["shape"][0] * entry["shape"][1]
    return {
        "layers": layers,
        "compressed_layers": len(layers),
        "compressed_weights": n_weights,
        "compressed_bytes": compressed_bytes,
        "bits_per_weight": 8 * compressed_bytes / n_weights if n_weights else 0.0,
        "total_bytes": _unique_bytes(model),
        "output_head": output_head,
    }


def format_report(summary: dict[str, Any]) -> str:
    """`report(model)` as a printable table: one row per layer, then the totals."""
    head = f"{'layer':48s} {'shape':>11s} {'tier':>5s} {'g':>4s} {'sparse':>6s} {'rank':>4s} {'bpw':>6s} {'rel.err':>8s}"
    lines = [head, "-" * len(head)]
    for name, e in summary["layers"].items():
        err = "-" if e.get("relative_error") is None else f"{e['relative_error']:.4f}"
        shape = f"{e['shape'][0]}x{e['shape'][1]}"
        lines.append(f"{name[-48:]:48s} {shape:>11s} {e['tier']:>5s} {e['group_size']:>4d} {str(e['sparsity'] or '-'):>6s} "
                     f"{e['rank']:>4d} {e['bits_per_weight']:>6.3f} {err:>8s}")
    lines.append("-" * len(head))
    h = summary.get("output_head")
    if h:
        lines.append(f"output head {h['name']} {h['shape'][0]}x{h['shape'][1]}: {TIER_NAMES.get(h['bits'], h['bits'])} "
                     f"g{h['group_size']}, {h['bits_per_weight']:.3f} bpw (not in the totals below)")
    lines.append(f"{summary['compressed_layers']} compressed layers, {summary['bits_per_weight']:.4f} bits per weight, "
                 f"{summary['compressed_bytes']} bytes compressed, {summary['total_bytes']} bytes in total")
    return "\n".join(lines)
