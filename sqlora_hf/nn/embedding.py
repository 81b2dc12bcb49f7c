"""`PackedEmbedding`: an input embedding that reads its rows from the packed output head.

Small models tie the input embedding to the output head, and that one matrix is a large share of
them (SmolLM2-135M: 28M of 135M weights, 113 MB in fp32). With `SQLoRAConfig(head_bits=8)` the head
is packed once as an `SQLoRALinear`; this module then serves embedding lookups from the same packed
rows, so the matrix is stored once, in int8, and the model keeps its tie in substance.

It owns no parameters or buffers: the head holds the tensors and saves them under its own name,
and the quantizer binds a fresh `PackedEmbedding` to the reloaded head (docs/format.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .linear import SQLoRALinear


class PackedEmbedding(nn.Module):
    """`embedding(ids) = rows ids of Ŵ_head + L_head[ids]·R_head`, dequantized on the fly."""

    def __init__(self, head: SQLoRALinear, padding_idx: Optional[int] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the head is registered once, where the model has it.
        self.__dict__["_head"] = head
        self.num_embeddings = head.out_features
        self.embedding_dim = head.in_features
        self.padding_idx = padding_idx
        self.output_dtype = dtype

    @property
    def head(self) -> SQLoRALinear:
        return self.__dict__["_head"]

    def __getattr__(self, name: str):
        # Not a property: an AttributeError raised inside a property is replaced by nn.Module's generic
        # "has no attribute" message. Still an AttributeError, so hasattr(emb, "weight") stays False.
        if name == "weight":
            raise AttributeError(
                "PackedEmbedding has no dense weight: its rows are the packed output head's "
                "(SQLoRAConfig(head_bits=...)); use .dequantize() for a dense copy. Resizing the vocabulary "
                "(resize_token_embeddings) needs the uncompressed model: resize it before compressing")
        return super().__getattr__(name)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.head.dequantize(dtype or self.output_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"PackedEmbedding expects integer token ids, got {input_ids.dtype}")
        rows = self.head.packed().rows(input_ids.reshape(-1)).dequantize(self.output_dtype)
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows read from the packed output head"
