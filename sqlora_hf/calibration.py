"""Calibration input: the forms users have (strings + tokenizer, a `datasets.Dataset`, token ids, or
"self": text sampled from the model being compressed, or for an encoder walks over its token embeddings),
turned into one LongTensor
`[samples, seq_len]`, and a small record of what was used.

The record (source, sample count, length, a hash) is what `config.json` keeps: the texts themselves
are not written, they may be private and they can be large.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from transformers.utils import logging as hf_logging

from .mixed_precision import bf16_linear_copies
from .embedding_walks import embedding_walks
from .sampling import sample_continuations

logger = hf_logging.get_logger("sqlora_hf")


SELF = "self"  # SQLoRAConfig(calibration="self"): sample the calibration text from the model itself
SELF_SOURCE = "self-generated"
WALKS_SOURCE = "self-generated (embedding walks)"
# its defaults: 8k tokens in 64 windows of 128. Generating is the slow part, and a step costs nearly as
# much for 16 rows as for 64, so many short windows are the cheap way to the same text; with the
# asymmetric calibration they also calibrate better. SmolLM2 at 4.25 bpw, three sampled sets each, 98
# evaluation windows: 64 x 128 1.074 / 1.082 / 1.075x the fp32 perplexity, 16 x 512 (the default before)
# 1.087 / 1.090 / 1.086x, 48 x 128 1.081-1.096x, 64 x 96 1.079-1.093x, 32 x 256 1.078 / 1.104x
# (docs/calibrated.md)
SELF_SAMPLES, SELF_SEQ_LEN = 64, 128
KV_MEMORY_SHARE = 0.25  # of the free memory, at most, for the sampling's KV cache
# An encoder's windows (walks over its token embeddings, `self_walks`): cheap to make, and more of them
# kept helping. MiniLM, cosine at 4.25 / 3.25 bpw: 16 x 512 0.978 / 0.907, 128 x 128 0.983 / 0.919,
# 512 x 64 0.984 / 0.929, 2048 x 32 0.986 / 0.933 in 18-19 s (docs/benchmarks_quality.md)
WALK_SAMPLES, WALK_SEQ_LEN = 2048, 32


def is_self(data: Any) -> bool:
    return isinstance(data, str) and data == SELF


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # long [samples, seq_len]
    record: dict[str, Any]


def _err(msg: str) -> ValueError:
    return ValueError(f"SQLoRAConfig.calibration: {msg}")


def describe(data: Any) -> str:
    if is_self(data):
        return SELF_SOURCE
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
    if is_self(data):
        return
    if isinstance(data, str):
        raise _err(f"pass a list of texts, not a single string (the one string accepted is {SELF!r}: "
                   "text sampled from the model itself)")
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int64, torch.int32) or data.dim() not in (1, 2) or data.numel() == 0:
            raise _err(f"token ids must be a non-empty 1-D or 2-D integer tensor, got {data.dtype} {tuple(data.shape)}")
        return
    if type(data).__name__ == "IterableDataset":
        raise _err("an IterableDataset cannot be measured and cut into windows here: pass a Dataset, e.g. "
                   "datasets.Dataset.from_list(list(iterable.take(2000)))")
    if _is_dataset(data):
        if "text" not in data.column_names:
            raise _err(f"the dataset has no 'text' column (columns: {list(data.column_names)})")
        return
    if isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise _err("the list of calibration texts is empty")
        if all(isinstance(t, str) for t in data):
            return
        if all(isinstance(t, torch.Tensor) for t in data):
            return
        raise _err("a list must hold only strings (texts) or only 1-D token-id tensors")
    raise _err(f"type {type(data).__name__!r} is not calibration data: pass None, {SELF!r}, a list of texts, a "
               "datasets.Dataset with a 'text' column, a token-id tensor or a list of 1-D token-id tensors")


def prepare(data: Any, tokenizer: Any, samples: int, seq_len: int, text_column: str = "text",
            model: Any = None) -> CalibrationBatch:
    """Tokenize and cut the calibration data into `samples` windows of `seq_len` tokens.

    Texts are joined (separated by the tokenizer's EOS when it has one) and cut into consecutive
    windows, the usual GPTQ protocol. With too few tokens, fewer windows are used; with fewer than
    `seq_len` tokens, a single shorter window. `"self"` samples the windows from `model`.
    """
    validate_calibration(data)
    if isinstance(data, dict):
        raise _err("this config only holds the record of a past calibration; pass the data again to recompress")
    source = describe(data)
    if is_self(data):
        if model is None:
            raise _err(f"{SELF!r} needs the model to sample from")
        _check_positions(model, seq_len)  # before minutes of sampling
        if can_generate_text(model):
            data = self_generated(model, samples, seq_len)
        else:
            data = self_walks(model, tokenizer, samples, seq_len)
            source = WALKS_SOURCE
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
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(unk, int) and ids.numel() and float((ids == unk).float().mean()) > 0.5:
            raise _err(f"the tokenizer turns {float((ids == unk).float().mean()):.0%} of the calibration text into "
                       f"its unknown token {getattr(tokenizer, 'unk_token', unk)!r}: it is probably not this model's "
                       "(transformers builds an empty one when none was saved); pass tokenizer=...")
    if ids.numel() == 0:
        raise _err("the calibration texts produce no tokens")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise _err(f"token ids must lie in [0, {vocab}) for this model's vocabulary; "
                   f"these range from {int(ids.min())} to {int(ids.max())}")
    if ids.numel() < seq_len:
        windows = ids.view(1, -1)
    else:
        n = min(samples, ids.numel() // seq_len)
        windows = ids[: n * seq_len].view(n, seq_len)
    if windows.shape[0] < samples:
        logger.warning(f"sqlora: the calibration data holds {ids.numel()} tokens, enough for {windows.shape[0]} "
                       f"of the {samples} samples of {seq_len} tokens asked for; using {windows.shape[0]}")
    _check_positions(model, windows.shape[1])
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    record = {"source": source, "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "sha256": digest}
    return CalibrationBatch(input_ids=windows, record=record)


def _check_positions(model: Any, seq_len: int) -> None:
    """Windows longer than the model's position table would index past it (GPT-2, BERT) or calibrate on
    positions the model never saw (RoPE): refused before sampling, or once real text is cut into windows."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and seq_len > limit:
        raise _err(f"calibration_seq_len={seq_len} is longer than the model's {limit} positions; "
                   f"choose calibration_seq_len <= {limit}")


def self_generated(model: Any, samples: int, seq_len: int, seed: int = 0, batch: int = 64) -> torch.Tensor:
    """`[samples, seq_len]` token ids sampled from the model itself (`calibration="self"`).

    Why: GPTQ needs inputs that look like what the model will see, not any particular corpus. Text
    the model writes itself exercises the same activation statistics, so compression becomes
    activation-aware without any data (the idea of LLM-QAT's data-free distillation). Each window
    starts from a token drawn uniformly from the vocabulary (special tokens left out), then the model
    continues by plain sampling at temperature 1: the random start spreads the windows over many
    topics, where sampling from BOS keeps returning to the model's favourite openings (SmolLM2-135M at
    4.25 bpw, 40 windows of evaluation, 64 x 256 tokens: 1.094x the fp32 perplexity against 1.105x from
    BOS). The default 64 x 128 gives 1.074-1.082x over 98 windows, against 1.28x data-free
    (docs/calibrated.md). `batch` windows are sampled together: a step's cost is mostly reading the
    weights, so 64 rows cost about twice what 16 do, not 4x (fewer rows where their KV cache would not
    fit: `rows_that_fit`). Deterministic for a given seed and batch on a given machine; the global RNG
    state is left untouched. EOS is never sampled, so every window runs to `seq_len` tokens. The
    sampling loop is `sampling.sample_continuations` (reserved KV cache, inverse-CDF draws): 1.33x
    faster than `model.generate` on SmolLM2. On CPUs with native bf16 the Linears sample with bf16
    copies of their weights (`mixed_precision.bf16_linear_copies`, unless `SQLORA_CALIBRATION_BF16=0`
    or memory is short): 1.27x faster again (SmolLM2, 32 x 512: 72 s against 92 s; 64 x 128 takes
    16-20 s), and the text is still the model's own, rounded the way a bf16 deployment of it would
    write.
    """
    if not can_generate_text(model):
        raise _err(f"{SELF!r} samples calibration text from the model, but {type(model).__name__} cannot generate "
                   "text (it is not a causal LM); pass calibration texts or token ids instead")
    if seq_len < 2:
        raise _err(f"calibration_seq_len must be at least 2 for {SELF!r} (a start token and one sampled token), "
                   f"got {seq_len}")
    allowed = _ordinary_token_ids(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    eos = _special_ids(model, ("eos_token_id",))  # a window runs to exactly seq_len tokens, as with min_new_tokens
    # every window's draws up front, so the windows do not depend on how many are sampled together
    starts = allowed[torch.randint(0, allowed.numel(), (samples,), generator=generator)]
    uniforms = torch.rand(samples, seq_len - 1, generator=generator)
    batch = rows_that_fit(model, seq_len, batch)
    rows = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), bf16_linear_copies(model, rows=batch), hf_logging.tqdm(
            total=samples * (seq_len - 1), desc="sqlora: sampling calibration text", unit="token",
            unit_scale=True) as bar:
        for first in range(0, samples, batch):
            start = starts[first:first + batch].unsqueeze(1).to(device)
            rows.append(sample_continuations(model, start, seq_len, uniforms[first:first + batch], banned=eos,
                                             on_step=bar.update))
    model.train(was_training)
    return torch.cat(rows)


def rows_that_fit(model: Any, seq_len: int, batch: int) -> int:
    """How many windows to sample together: `batch`, or fewer where their keys and values (reserved
    for `seq_len` positions) would take more than `KV_MEMORY_SHARE` of the free memory. A 7B Llama
    keeps 1 MB of fp32 keys and values per token, so 64 windows of 2048 tokens would need 128 GB;
    SmolLM2's default 64 x 128 needs 0.4 GB. Models whose config does not give the cache's size keep
    `batch`."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return batch
    per_window = 2 * layers * kv_heads * head_dim * seq_len * next(model.parameters()).element_size()
    from .mixed_precision import _available_memory_bytes

    return max(1, min(batch, int(KV_MEMORY_SHARE * _available_memory_bytes() // per_window)))


def can_generate_text(model: Any) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate())


def self_walks(model: Any, tokenizer: Any, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`[samples, seq_len]` token ids for a model that cannot generate (`calibration="self"` on an encoder):
    walks over related tokens of its own input embeddings, with function words and punctuation between
    them (`embedding_walks`). The tokenizer finds those; without one this is a clear error."""
    if tokenizer is None:
        raise _err(f"{SELF!r} on {type(model).__name__}, which cannot generate text, builds its calibration windows "
                   "from the model's token embeddings and needs its tokenizer: save the tokenizer beside the model "
                   "or pass SQLoRAConfig(tokenizer=...)")
    vocab = model.get_input_embeddings().num_embeddings
    special = _special_ids(model, ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                                   "sep_token_id", "cls_token_id"), vocab)
    special |= {i for i in getattr(tokenizer, "all_special_ids", []) if isinstance(i, int) and 0 <= i < vocab}
    with hf_logging.tqdm(total=1, desc="sqlora: walking the token embeddings", unit="set") as bar:
        windows = embedding_walks(model.get_input_embeddings().weight, tokenizer, samples, seq_len, special, seed)
        bar.update(1)
    return windows


def _ordinary_token_ids(model: Any) -> torch.Tensor:
    """Every token id of the model's vocabulary except the special ones its configs name (BOS, EOS, pad)."""
    vocab = model.get_input_embeddings().num_embeddings
    vocab = min(vocab, getattr(model.config, "vocab_size", None) or vocab)
    special = _special_ids(model, ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"), vocab)
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[list(special)] = False
    if not keep.any():
        raise _err(f"{SELF!r} needs at least one ordinary token to start sampling from; the vocabulary has none")
    return keep.nonzero().flatten()


def _special_ids(model: Any, keys: Sequence[str], vocab: Optional[int] = None) -> set[int]:
    """The ids below `vocab` (default: the embedding size) that the model's config and generation config
    give for `keys` (each may be one id or a list)."""
    vocab = vocab if vocab is not None else model.get_input_embeddings().num_embeddings
    ids = set()
    for cfg in (getattr(model, "generation_config", None), model.config):
        for key in keys:
            value = getattr(cfg, key, None)
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(v, int) and 0 <= v < vocab:
                    ids.add(v)
    return ids


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
