"""What a saved sqlora_hf checkpoint directory is, and which of its files belong on the Hub.

Pushing checks the directory *before* any network call: uploading a directory that transformers
cannot load with `import sqlora_hf` (an fp model, a foreign quantization, a half-written save)
would publish something broken under a name people trust.
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Any

from ..config import QUANT_METHOD

# Files a saved model + tokenizer consist of. Everything else in the directory (README.md and the
# allocation PNG are regenerated; notes, logs, pickles) stays local.
UPLOAD_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


class NotAnSQLoRACheckpointError(ValueError):
    """The directory is not a model saved by sqlora_hf (see the message for what is missing)."""


def read_sqlora_config(directory: str) -> dict[str, Any]:
    """config.json of an sqlora_hf checkpoint; raises `NotAnSQLoRACheckpointError` naming what is wrong."""
    if not os.path.isdir(directory):
        raise NotAnSQLoRACheckpointError(f"{directory!r} is not a directory")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise NotAnSQLoRACheckpointError(
            f"{directory!r} has no config.json, so it is not a saved transformers model; "
            "compress one with `sqlora compress MODEL OUT` or `model.save_pretrained(OUT)`"
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise NotAnSQLoRACheckpointError(f"{config_path} is not readable JSON: {err}") from None
    qconfig = config.get("quantization_config") or {}
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method != QUANT_METHOD:
        found = f"quant_method={method!r}" if method else "no quantization_config"
        raise NotAnSQLoRACheckpointError(
            f"{directory!r} is not an sqlora_hf checkpoint (config.json has {found}, expected "
            f"quant_method='{QUANT_METHOD}'); compress it first with `sqlora compress`"
        )
    weights = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    if not weights:
        raise NotAnSQLoRACheckpointError(f"{directory!r} has config.json but no .safetensors weight files")
    if not _has_packed_tensor(directory, weights):
        raise NotAnSQLoRACheckpointError(
            f"{directory!r} says quant_method='{QUANT_METHOD}' but its safetensors files hold no packed "
            "layer (no '*.qmeta' tensor); the save is incomplete or was made by another tool"
        )
    return config


def _has_packed_tensor(directory: str, weight_files: list[str]) -> bool:
    from safetensors import safe_open

    for name in sorted(weight_files):
        try:
            with safe_open(os.path.join(directory, name), framework="pt") as handle:
                if any(key.endswith(".qmeta") for key in handle.keys()):
                    return True
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise NotAnSQLoRACheckpointError(f"{name} in {directory!r} is not a readable safetensors file: {err}") \
                from None
    return False


def files_to_upload(directory: str) -> list[str]:
    """Names (relative to `directory`) of the model and tokenizer files, sorted."""
    names = []
    for name in sorted(os.listdir(directory)):
        if os.path.isfile(os.path.join(directory, name)) and any(fnmatch.fnmatch(name, p) for p in UPLOAD_PATTERNS):
            names.append(name)
    return names


def model_class_name(config: dict[str, Any]) -> str:
    """The transformers Auto class a user loads this architecture with (for the card's snippet)."""
    arch = (config.get("architectures") or [""])[0]
    for suffix, auto in (
        ("ForCausalLM", "AutoModelForCausalLM"),
        ("LMHeadModel", "AutoModelForCausalLM"),
        ("ForMaskedLM", "AutoModelForMaskedLM"),
        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
        ("ForTokenClassification", "AutoModelForTokenClassification"),
        ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
        ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ):
        if arch.endswith(suffix):
            return auto
    return "AutoModel"


PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForSeq2SeqLM": "text2text-generation",
    "AutoModel": "feature-extraction",
}


def load_checkpoint(directory: str):
    """Load a checkpoint (validated by `read_sqlora_config`) on CPU with the class it was saved from."""
    import transformers

    config = read_sqlora_config(directory)
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = getattr(transformers, model_class_name(config))
    return cls.from_pretrained(directory)
