"""PEFT (LoRA) fine-tuning of sqlora-compressed models.

PEFT does not know `SQLoRALinear`; its supported extension point is a per-config registration
(`LoraConfig._register_custom_module`), which is not saved with the adapter. So the integration is
a few explicit calls rather than a hidden patch of PEFT:

    config = sqlora_hf.lora_config(model, r=16, target_modules="all-linear")   # LoraConfig + registration
    peft_model = get_peft_model(model, config)                                 # PEFT's own function
    ...train...
    peft_model.save_pretrained(adapter_dir)
    peft_model = sqlora_hf.load_adapter(compressed_model, adapter_dir)          # = PeftModel.from_pretrained
    merged = sqlora_hf.merge_and_unload(peft_model, rank=None)                  # exact merge into L·R

`init_from_correction=True` starts each adapter from the layer's own low-rank correction
(`init_lora_weights="sqlora_correction"`, which is saved in adapter_config.json so a reload moves the
correction out of the base again). PEFT itself is imported only when one of these is called.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

from torch import nn
from transformers.utils import logging as hf_logging

CORRECTION_INIT = "sqlora_correction"
logger = hf_logging.get_logger("sqlora_hf")

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig, PeftModel


def register_peft(config: "LoraConfig") -> "LoraConfig":
    """Teach one `LoraConfig` to put `SQLoRALoraLinear` on `SQLoRALinear` targets; returns the config."""
    from ..nn.linear import SQLoRALinear
    from .layer import SQLoRALoraLinear

    config._register_custom_module({SQLoRALinear: SQLoRALoraLinear})
    return config


def lora_config(model: Optional[nn.Module] = None, *, init_from_correction: bool = False, **kwargs: Any) -> "LoraConfig":
    """`LoraConfig(**kwargs)` registered for `SQLoRALinear` layers.

    Args:
        model: needed only for `target_modules="all-linear"`: PEFT's own expansion looks for
            `nn.Linear` and so would skip every compressed layer; here it is expanded to the
            compressed and plain linear layers of `model` except the output embedding.
        init_from_correction: start the adapters from the layers' low-rank correction (LoftQ-style)
            instead of PEFT's zero-initialised B. Same as `init_lora_weights="sqlora_correction"`.
        **kwargs: any `LoraConfig` field (r, lora_alpha, lora_dropout, use_rslora, target_modules, ...).
    """
    from peft import LoraConfig

    from ..nn.linear import SQLoRALinear

    if init_from_correction:
        if kwargs.get("init_lora_weights", True) not in (True, CORRECTION_INIT):
            raise ValueError("init_from_correction=True conflicts with init_lora_weights="
                             f"{kwargs['init_lora_weights']!r}; pass one of them")
        kwargs["init_lora_weights"] = CORRECTION_INIT
        if model is not None and not any(getattr(m, "rank", 0) for m in model.modules() if isinstance(m, SQLoRALinear)):
            logger.warning("sqlora: init_from_correction=True, but no layer of this model has a low-rank correction "
                           "(rank 0 everywhere, as the default 4.25 bpw compression gives): the adapters start from "
                           "zero as usual. Compress with a rank (e.g. SQLoRAConfig(rank=16, memory_budget=None)) "
                           "to start from one")
    target = kwargs.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear":
        if model is None:
            raise ValueError("target_modules='all-linear' needs the model: sqlora_hf.lora_config(model, ...), "
                             "because PEFT's expansion only finds nn.Linear layers, not compressed ones")
        kwargs["target_modules"] = all_linear_names(model)
    return register_peft(LoraConfig(**kwargs))


def all_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the compressed and plain linear layers of `model`, the output embedding excluded."""
    from transformers.pytorch_utils import Conv1D

    from ..nn.linear import SQLoRALinear
    from ..output_head import head_and_embedding

    head_name = head_and_embedding(model)[0]
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name and isinstance(module, (SQLoRALinear, nn.Linear, Conv1D))}
    if head_name:
        names.discard(head_name.rsplit(".", 1)[-1])
    if not names:
        raise ValueError("target_modules='all-linear' found no linear layers in this model")
    return sorted(names)


def load_adapter(model: nn.Module, adapter_dir: str, adapter_name: str = "default", is_trainable: bool = False,
                 **kwargs: Any) -> "PeftModel":
    """`PeftModel.from_pretrained` (or `PeftModel.load_adapter` when `model` is already a PeftModel)
    with the saved config registered for `SQLoRALinear`, which PEFT does not persist."""
    from peft import LoraConfig, PeftModel

    config = register_peft(LoraConfig.from_pretrained(adapter_dir))
    if isinstance(model, PeftModel):
        config.inference_mode = not is_trainable
        model.add_adapter(adapter_name, config)
        model.load_adapter(adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
        return model
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kwargs)


def merge_and_unload(peft_model: "PeftModel", rank: Union[None, int, str] = None, safe_merge: bool = False,
                     adapter_names: Optional[list[str]] = None) -> nn.Module:
    """Merge the active (or named) adapters into the compressed layers and return the base model.

    Args:
        rank: None grows each layer's rank by the adapter rank (exact up to float16 rounding of the
            adapter); an int re-truncates every merged layer to that rank by SVD; "keep" to the rank
            the layer was compressed with (counting components `init_from_correction` moved into the
            adapter); refused, before any merge, where a layer has no correction (rank 0). Codes, scales
            and masks are never touched.
    """
    from .layer import SQLoRALoraLinear

    layers = [m for m in peft_model.modules() if isinstance(m, SQLoRALoraLinear)]
    # Resolved and checked for every layer first: a refusal must merge nothing.
    if rank == "keep":
        ranks = {id(m): m.kept_rank() for m in layers}
        empty = [m for m in layers if ranks[id(m)] == 0]
        if empty:
            raise ValueError(f"merge_and_unload(rank='keep'): {empty[0]._layer_name()} and {len(empty) - 1} other layer(s) "
                             "have no low-rank correction (rank 0, as the default 4.25 bpw compression gives), so "
                             "there is no size to keep; use rank=None (grow by the adapter rank) or an int. "
                             "Nothing was merged")
    else:
        for module in layers if rank is not None else []:
            base = module.get_base_layer()
            limit = min(base.in_features, base.out_features)
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= limit:
                raise ValueError(f"merge_and_unload(rank={rank!r}): rank must be None (grow), 'keep' or an int in "
                                 f"[1, {limit}] for {module._layer_name()} ({base.out_features} x {base.in_features}); "
                                 "nothing was merged")
        ranks = {id(m): rank for m in layers}
    for module in layers:
        module.merge_rank = ranks[id(module)]
    return peft_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)


def gradient_checkpointing_recipe(model: nn.Module, use_reentrant: bool = False) -> nn.Module:
    """What `prepare_model_for_kbit_training` would do for a known k-bit method, for sqlora models.

    Freezes the base, enables gradient checkpointing and makes the embeddings' output require
    grad so checkpointed blocks see a grad-requiring input. Call it before `get_peft_model`.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    return model


__all__ = ["CORRECTION_INIT", "all_linear_names", "gradient_checkpointing_recipe", "load_adapter", "lora_config",
           "merge_and_unload", "register_peft"]
