"""Calibration input: the forms users have (strings + tokenizer, a `datasets.Dataset`, token ids),
turned into one LongTensor `[samples, seq_len]`, and a small record of what was used.

The record (source, sample count, length, a hash) is what `config.json` keeps: the texts themselves
are not written, they may be private and they can be large.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from transformers.utils import logging as hf_logging

logger = hf_logging.get_logger("sqlora_hf")


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # long [samples, seq_len]
    record: dict[str, Any]


def _err(msg: str) -> ValueError:
    return ValueError(f"SQLoRAConfig.calibration: {msg}")


def describe(data: Any) -> str:
    if isinstance(data, dict) and "sha256" in data:
        return str(data.get("source", "record"))
    if isinstance(data, torch.Tensor):
        return "token-ids"
    if _is_dataset(data):
        return f"datasets.Dataset({len(data)} rows)"
    if isinstance(data, (list, tuple)):
        return "texts" if all(isinstance(t, str) for t in data) else "token-ids"
    return type(data).__name__


def _is_dataset(data: Any) -> bool:
    return type(data).__name__ in ("Dataset", "IterableDataset") and hasattr(data, "column_names")


def validate_calibration(data: Any) -> None:
    """Cheap structural checks at config time (tokenization happens later, when a tokenizer is known)."""
    if data is None:
        return
    if isinstance(data, dict):
        if "sha256" not in data:
            raise _err("a dict is only accepted as the record of a past calibration (it needs 'sha256')")
        return
    if isinstance(data, str):
        raise _err("pass a list of texts, not a single string")
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int64, torch.int32) or data.dim() not in (1, 2) or data.numel() == 0:
            raise _err(f"token ids must be a non-empty 1-D or 2-D integer tensor, got {data.dtype} {tuple(data.shape)}")
        return
    if _is_dataset(data):
        return
    if isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise _err("the list of calibration texts is empty")
        if all(isinstance(t, str) for t in data):
            return
        if all(isinstance(t, torch.Tensor) for t in data):
            return
        raise _err("a list must hold only strings (texts) or only 1-D token-id tensors")
    raise _err(f"unsupported type {type(data).__name__}; allowed: list of str, datasets.Dataset, token-id tensor")


def prepare(data: Any, tokenizer: Any, samples: int, seq_len: int, text_column: str = "text") -> CalibrationBatch:
    """Tokenize and cut the calibration data into `samples` windows of `seq_len` tokens.

    Texts are joined (separated by the tokenizer's EOS when it has one) and cut into consecutive
    windows, the usual GPTQ protocol. With too few tokens, fewer windows are used; with fewer than
    `seq_len` tokens, a single shorter window.
    """
    validate_calibration(data)
    if isinstance(data, dict):
        raise _err("this config only holds the record of a past calibration; pass the data again to recompress")
    source = describe(data)
    if isinstance(data, torch.Tensor) or (isinstance(data, (list, tuple)) and isinstance(data[0], torch.Tensor)):
        rows = [data] if isinstance(data, torch.Tensor) and data.dim() == 1 else list(data)
        ids = torch.cat([torch.as_tensor(r).reshape(-1).long() for r in rows])
    else:
        if _is_dataset(data):
            if text_column not in data.column_names:
                raise _err(f"the dataset has no '{text_column}' column (columns: {data.column_names})")
            texts = [t for t in data[text_column] if isinstance(t, str)]
        else:
            texts = list(data)
        if tokenizer is None:
            raise _err("texts need a tokenizer: pass tokenizer=..., or save one beside the model being loaded")
        ids = _tokenize(texts, tokenizer, samples * seq_len)
    if ids.numel() == 0:
        raise _err("the calibration texts produce no tokens")
    if ids.numel() < seq_len:
        windows = ids.view(1, -1)
    else:
        n = min(samples, ids.numel() // seq_len)
        windows = ids[: n * seq_len].view(n, seq_len)
    if windows.shape[0] < samples:
        logger.warning(f"sqlora: the calibration data holds {ids.numel()} tokens, enough for {windows.shape[0]} "
                       f"of the {samples} samples of {seq_len} tokens asked for; using {windows.shape[0]}")
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    record = {"source": source, "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "sha256": digest}
    return CalibrationBatch(input_ids=windows, record=record)


def _tokenize(texts: Sequence[str], tokenizer: Any, enough: Optional[int] = None) -> torch.Tensor:
    """Token ids of the texts joined by EOS; stops once `enough` tokens are collected."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pieces = []
    count = 0
    for text in texts:
        if enough is not None and count >= enough:
            break
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            pieces.append(torch.tensor(ids, dtype=torch.long))
            count += len(ids) + (eos is not None)
            if eos is not None:
                pieces.append(torch.tensor([eos], dtype=torch.long))
    if not pieces:
        raise _err("the calibration texts are empty or shorter than one token")
    return torch.cat(pieces)
