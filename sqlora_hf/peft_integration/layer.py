"""`SQLoRALoraLinear`: PEFT's LoRA layer for a compressed `SQLoRALinear` base.

Forward, dropout, scaling, rsLoRA, several adapters and adapter switching are PEFT's own
`lora.Linear` code unchanged (the base layer is called as a black box). What differs:

- **init from the correction** (`init_lora_weights="sqlora_correction"`): the adapter starts as the
  leading `min(r, rank)` components of the layer's own `L·R`, which are removed from the base, so the
  model starts exactly where the compressed model is and training updates the correction itself.
- **merge** folds `B·A·scaling` into `lowrank_l`/`lowrank_r` (`lowrank_merge.fold_delta`) instead of
  adding a dense delta to a weight the layer does not have; `qcodes`/`qscales`/`qmask` are untouched.
  `unmerge` puts the saved factors (and qmeta) back, so it is exact.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from ..nn.linear import SQLoRALinear
from . import CORRECTION_INIT
from .lowrank_merge import MergeRank, fold_delta, with_lowrank


class SQLoRALoraLinear(LoraLinear):
    """LoRA on a `SQLoRALinear`; see the module docstring for what differs from `lora.Linear`."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.fan_in_fan_out:
            # SQLoRALinear always computes x·Wᵀ like nn.Linear (GPT-2's Conv1D is transposed when packed).
            warnings.warn("fan_in_fan_out=True is ignored for SQLoRALinear targets (they compute x·Wᵀ like nn.Linear)")
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    # ---- state kept outside the state dict ---------------------------------------------------
    @property
    def merge_rank(self) -> MergeRank:
        """How `merge` writes the factors: None = grow (exact), int = truncate to that rank, "keep"."""
        return self.__dict__.get("_merge_rank")

    @merge_rank.setter
    def merge_rank(self, value: MergeRank) -> None:
        self.__dict__["_merge_rank"] = value

    def _merge_snapshots(self) -> list:
        return self.__dict__.setdefault("_sqlora_merge_snapshots", [])

    def _layer_name(self) -> str:
        return self.kwargs.get("target_name") or "SQLoRALinear"

    def _get_in_out_features(self, module) -> tuple[int, int]:
        # PEFT's generic lookup warns "Unsupported layer type" for every custom layer; ours is known.
        return module.in_features, module.out_features

    # ---- adapters ----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        base = self.get_base_layer()
        if not isinstance(base, SQLoRALinear):
            raise TypeError(f"SQLoRALoraLinear needs a SQLoRALinear base layer, got {type(base).__name__}")
        limit = min(base.in_features, base.out_features)
        if not isinstance(r, int) or r > limit:
            raise ValueError(
                f"LoRA rank r={r} for adapter {adapter_name!r} on {kwargs.get('target_name') or 'a layer'} is larger "
                f"than the layer allows: min(in_features={base.in_features}, out_features={base.out_features}) = {limit}"
            )
        if config.use_dora or config.init_lora_weights not in (True, False, "gaussian", CORRECTION_INIT):
            raise ValueError(
                f"LoraConfig for SQLoRALinear layers: init_lora_weights must be True, False, 'gaussian' or "
                f"{CORRECTION_INIT!r} and use_dora must be False (got init_lora_weights={config.init_lora_weights!r}, "
                f"use_dora={config.use_dora})"
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        if init_lora_weights != CORRECTION_INIT:
            return super().reset_lora_parameters(adapter_name, init_lora_weights)
        super().reset_lora_parameters(adapter_name, True)  # kaiming A, zero B for components beyond the correction
        if adapter_name in self.lora_A:
            self._init_from_correction(adapter_name)

    def _init_from_correction(self, adapter_name: str) -> None:
        """Move the leading components of the base's `L·R` into this adapter (B·A·scaling = L·R exactly).

        The first adapter initialised this way takes `min(r, rank)` components out of the base; later
        ones copy the same components (they need `r` at least that large), so each adapter alone
        reproduces the compressed model.
        """
        base = self.get_base_layer()
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        taken = self.__dict__.get("_sqlora_taken_correction")
        if taken is None:
            packed = base.packed()
            k = min(r, packed.rank)
            if k == 0:
                return  # no correction in this layer: a plain zero-initialised adapter
            left, right = packed.lowrank_l, packed.lowrank_r
            taken = (left[:, :k].clone(), right[:k].clone())
            rest = packed.rank - k
            base.set_packed(with_lowrank(packed, left[:, k:].clone() if rest else None,
                                         right[k:].clone() if rest else None))
            self.__dict__["_sqlora_taken_correction"] = taken
        left, right = taken
        k = left.shape[1]
        if r < k:
            raise ValueError(
                f"adapter {adapter_name!r} on {self._layer_name()} has r={r}, but another adapter already took "
                f"{k} correction components out of this layer; init_lora_weights={CORRECTION_INIT!r} needs r >= {k} here"
            )
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            lora_a[:k].copy_(right.to(device=lora_a.device, dtype=torch.float32))
            lora_b[:, :k].copy_(left.to(device=lora_b.device, dtype=torch.float32) / scaling)

    def kept_rank(self) -> int:
        """What `merge_and_unload(rank="keep")` keeps: the base's rank as compressed, counting the components
        `init_from_correction` moved into the adapter (they return with the merge)."""
        taken = self.__dict__.get("_sqlora_taken_correction")
        return self.get_base_layer().packed().rank + (0 if taken is None else taken[0].shape[1])

    # ---- merge -------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters into the base's low-rank factors (see `lowrank_merge.fold_delta`)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            packed = base.packed()
            scaling = self.scaling[name]
            delta_left = self.lora_B[name].weight.detach().to(torch.float64) * scaling
            delta_right = self.lora_A[name].weight.detach().to(torch.float64)
            if safe_merge and not (torch.isfinite(delta_left).all() and torch.isfinite(delta_right).all()):
                raise ValueError(f"NaNs detected in the adapter {name!r} of {self._layer_name()}; not merged")
            merged = fold_delta(packed, delta_left, delta_right, rank=self.merge_rank, name=self._layer_name())
            old_bias = None
            if self.lora_bias[name]:
                if base.bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
                old_bias = base.bias.data.clone()
                base.bias.data += (self.lora_B[name].bias * scaling).to(base.bias.dtype)
            self._merge_snapshots().append((packed, old_bias))
            base.set_packed(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the factors, qmeta and bias saved by `merge`, byte for byte."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        snapshots = self._merge_snapshots()
        while self.merged_adapters:
            self.merged_adapters.pop()
            packed, old_bias = snapshots.pop()
            base.set_packed(packed)
            if old_bias is not None:
                base.bias.data = old_bias

    def __repr__(self) -> str:
        return "sqlora." + super().__repr__()

