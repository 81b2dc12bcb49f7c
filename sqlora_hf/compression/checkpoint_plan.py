"""Plan a whole checkpoint under a memory budget before transformers loads it.

transformers hands the quantizer one tensor at a time, but a budget is global: which layer can
afford 8 bits depends on what every other layer costs. So the quantizer calls `plan_checkpoint`
first: it reads each Linear weight from the safetensors files (memory-mapped, one tensor at a
time), builds that layer's candidates, keeps their Pareto front, and solves the knapsack. The
plan then fixes a `CompressionSpec` per layer, applied as each tensor arrives.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

import torch

from .compress import CompressionSpec
from .planner import (Budget, BudgetError, Candidate, budget_advice, auto_target_bytes, layer_candidates, pareto_front,
                      solve_budget)


@dataclass
class LayerToPlan:
    """A Linear to compress: its module name, the checkpoint key of its weight, and orientation."""

    name: str
    key: str
    transposed: bool = False  # GPT-2 Conv1D stores [in, out]


@dataclass
class Plan:
    specs: dict[str, CompressionSpec]
    chosen: dict[str, Candidate]
    layer_budget: int
    fixed_bytes: int

    @property
    def layer_bytes(self) -> int:
        return sum(c.nbytes for c in self.chosen.values())


def find_keys(checkpoint_files: Sequence[str]) -> dict[str, str]:
    """{tensor key: file} over all safetensors files of a checkpoint (headers only)."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for path in checkpoint_files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                out[key] = str(path)
    return out


def iter_weights(layers: Sequence[LayerToPlan], key_files: dict[str, str]) -> Iterable[tuple[LayerToPlan, torch.Tensor]]:
    """Yield each layer's weight as `[out, in]`, loading one tensor at a time from the mmap'd files."""
    from safetensors import safe_open

    handles: dict[str, object] = {}
    try:
        for layer in layers:
            path = key_files[layer.key]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt").__enter__()
            t = handles[path].get_tensor(layer.key)
            yield layer, (t.t() if layer.transposed else t)
            del t
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def plan_checkpoint(layers: Sequence[LayerToPlan], checkpoint_files: Sequence[str], budget: Budget,
                    fixed_bytes: int, base: CompressionSpec, tiers: Sequence[int],
                    budget_text: Optional[str] = None) -> Plan:
    """Choose one configuration per layer so the model fits `budget` with the least summed error.

    `fixed_bytes` is everything the compression does not touch (embeddings, norms, biases, head).
    Raises `BudgetError` naming the least achievable size when the budget cannot be met.
    """
    key_files = find_keys(checkpoint_files)
    missing = [layer.key for layer in layers if layer.key not in key_files]
    if missing:
        raise ValueError(f"memory_budget planning could not find {missing[:3]} in the checkpoint files")
    fronts: list[list[Candidate]] = []
    n_weights = 0
    auto_bytes = 0
    for layer, weight in iter_weights(layers, key_files):
        n, k = weight.shape
        n_weights += n * k
        if not bool(torch.isfinite(weight).all()):
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(f"{layer.name}: the weight holds {bad} NaN/Inf values; refusing to compress it")
        auto_bytes += auto_target_bytes(n, k, base.bits, base.group_size, base.sparsity, base.rank)
        cands = layer_candidates(weight, tiers, base.sparsity, base.rank, base.max_rank_bpw,
                                 scale_search=base.scale_search,
                                 min_group_size=base.group_size if budget.auto else 0)
        if not cands:
            raise ValueError(f"{layer.name}: no tier in {list(tiers)} can pack in_features={k}")
        fronts.append(pareto_front(cands))
    least = sum(f[0].nbytes for f in fronts)
    # "auto" is the size of the uniform layout, a target rather than a promise: where the per-layer
    # metadata cannot be paid for by coarser groups (group_size already the largest), take the least
    # achievable instead of failing a load the user never gave a budget for.
    layer_budget = max(auto_bytes, least) if budget.auto else budget.layer_bytes(n_weights, fixed_bytes)
    shown = budget_text or budget.describe()
    if least > layer_budget:
        minimum_total = least + fixed_bytes
        raise BudgetError(
            f"SQLoRAConfig.memory_budget={shown!r} cannot be met: the smallest achievable is "
            f"{minimum_total} bytes for the whole model ({8 * least / n_weights:.3f} bits per weight over "
            f"the compressed layers, with tiers {list(tiers)}); the uncompressed parts alone take {fixed_bytes} bytes. "
            + budget_advice(tiers, base.rank, base.sparsity)
        )
    choice = solve_budget(fronts, layer_budget)
    specs: dict[str, CompressionSpec] = {}
    chosen: dict[str, Candidate] = {}
    for layer, front, j in zip(layers, fronts, choice):
        c = front[j]
        chosen[layer.name] = c
        specs[layer.name] = replace(base, bits=c.bits, group_size=c.group_size, rank=c.rank)
    return Plan(specs, chosen, layer_budget, fixed_bytes)
