"""`SQLoRAConfig(head_bits=8)`: pack the output head (and a tied input embedding with it).

Why: once the transformer's Linears are packed, the output head is the largest matrix left in fp
and, at batch 1, a fifth of the decode time of SmolLM2-135M (docs/benchmarks.md). Int8 rows with
group scales read a quarter of its bytes and cost little quality (measured in docs/benchmarks.md).

- Untied head: it becomes an `SQLoRALinear` with `head_bits` codes; the input embedding stays.
- Tied head (SmolLM2, Qwen2-0.5B, GPT-2, ...): the shared matrix is packed once under the head's
  name and the input embedding becomes a `PackedEmbedding` that gathers rows from it. The model's
  `tie_word_embeddings` is set to False (the tie is now one packed tensor, which transformers'
  tying cannot express), and on reload `bind_packed_embedding` restores the sharing.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .compression import CompressionSpec
from .formats.layer import ALLOWED_GROUP_SIZES, layout_problem
from .nn.embedding import PackedEmbedding
from .nn.linear import SQLoRALinear

logger = hf_logging.get_logger("sqlora_hf")


def _name_of(model: nn.Module, target: Optional[nn.Module]) -> Optional[str]:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def head_and_embedding(model: nn.Module) -> tuple[Optional[str], Optional[str]]:
    """Module names of the output head and the input embedding (None where the model has none)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return _name_of(model, head), _name_of(model, emb)


def _group_size_for(in_features: int, preferred: int, bits: int) -> int:
    for g in (preferred, *ALLOWED_GROUP_SIZES):
        if layout_problem(bits, g, None, in_features) is None:
            return g
    raise ValueError(f"SQLoRAConfig.head_bits: the output head's in_features={in_features} is not a multiple of "
                     f"any group size {list(ALLOWED_GROUP_SIZES)}, so it cannot be packed; use head_bits=None")


def _untie(model: nn.Module) -> None:
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def compress_output_head(model: nn.Module, config: Any) -> Optional[str]:
    """Pack the output head at `config.head_bits` in place; returns its name (None if nothing to do)."""
    if config.head_bits is None:
        return None
    head_name, emb_name = head_and_embedding(model)
    head = model.get_submodule(head_name) if head_name else None
    if head is None:
        logger.warning(f"sqlora: head_bits={config.head_bits} does nothing for this {type(model).__name__}: it has "
                       "no output head")
        return None
    if isinstance(head, SQLoRALinear):
        return None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"SQLoRAConfig.head_bits={config.head_bits}: the output head {head_name} is a "
                         f"{type(head).__name__}, not a Linear; use head_bits=None for this model")
    emb = model.get_submodule(emb_name) if emb_name else None
    tied = isinstance(emb, nn.Embedding) and emb.weight.data_ptr() == head.weight.data_ptr()
    weight = head.weight.detach()
    spec = CompressionSpec(bits=config.head_bits, group_size=_group_size_for(weight.shape[1], config.group_size,
                                                                             config.head_bits), rank=0)
    new = SQLoRALinear.from_dense(weight.to(torch.float32), head.bias, spec, head_name,
                                  compute_dtype=config.torch_compute_dtype, backend=config.backend)
    model.set_submodule(head_name, new)
    if tied and type(emb) is nn.Embedding:
        model.set_submodule(emb_name, PackedEmbedding(new, emb.padding_idx, weight.dtype))
    # A subclass may do more than a lookup (Gemma scales its embeddings), so it keeps its own fp
    # weight; either way the head no longer shares a tensor with it, and the config must say so.
    if tied:
        _untie(model)
    return head_name


def bind_packed_embedding(model: nn.Module, checkpoint_keys: set[str], packed_prefixes: set[str]) -> None:
    """On reload of a `head_bits` checkpoint: if it packed the head and has no input-embedding weight,
    the embedding was tied to the head when it was compressed, so it reads the head's packed rows again."""
    head_name, emb_name = head_and_embedding(model)
    if head_name not in packed_prefixes or emb_name is None or f"{emb_name}.weight" in checkpoint_keys:
        return
    head = model.get_submodule(head_name)
    emb = model.get_submodule(emb_name)
    if not isinstance(emb, nn.Embedding) or tuple(emb.weight.shape) != (head.out_features, head.in_features):
        raise ValueError(f"the checkpoint has no {emb_name}.weight and its packed head {head_name} "
                         f"does not have the embedding's shape; the checkpoint is incomplete")
    model.set_submodule(emb_name, PackedEmbedding(head, emb.padding_idx, emb.weight.dtype))
