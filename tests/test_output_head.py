"""`SQLoRAConfig(head_bits=8)`: the packed output head and the tied embedding that reads from it."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

import sqlora_hf
from sqlora_hf import SQLoRAConfig, SQLoRALinear
from sqlora_hf.nn.embedding import PackedEmbedding


def _load(path, **cfg):
    from transformers import AutoModelForCausalLM

    if not cfg:  # a saved sqlora checkpoint: its own config.json says how to load it
        return AutoModelForCausalLM.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=SQLoRAConfig(**cfg))


def test_tied_head_is_packed_once_and_the_embedding_reads_its_rows(tiny_model_dirs, tmp_path):
    path, _ = tiny_model_dirs["llama"]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    plain, packed = _load(path, rank=0), _load(path, rank=0, head_bits=8)
    assert isinstance(packed.lm_head, SQLoRALinear) and packed.lm_head.bits == 8
    assert isinstance(packed.model.embed_tokens, PackedEmbedding)
    assert packed.config.tie_word_embeddings is False
    # The embedding is exactly the packed head's rows.
    rows = packed.model.embed_tokens(ids)
    torch.testing.assert_close(rows, packed.lm_head.dequantize()[ids], rtol=0, atol=0)
    # no dense weight: a clear AttributeError (hasattr stays False), also for resize_token_embeddings
    assert not hasattr(packed.model.embed_tokens, "weight")
    with pytest.raises(AttributeError, match="no dense weight.*resize it before compressing"):
        packed.resize_token_embeddings(300)
    # Int8 rows barely move the logits of the otherwise identical compressed model.
    with torch.no_grad():
        a, b = plain(ids).logits, packed(ids).logits
    assert float((a - b).norm() / a.norm()) < 0.02
    # Stored once: no embedding weight in the checkpoint, and the head's int8 bytes replace it.
    saved = sqlora_hf.report(plain)["total_bytes"] - sqlora_hf.report(packed)["total_bytes"]
    assert saved > 256 * 128 * (4 - 1.2)  # fp32 rows out, int8 rows + fp16 group scales in
    packed.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" not in keys and "lm_head.qcodes" in keys
    again = _load(tmp_path / "q")
    assert isinstance(again.model.embed_tokens, PackedEmbedding) and again.model.embed_tokens.head is again.lm_head
    with torch.no_grad():
        assert torch.equal(again(ids).logits, b)
    assert again.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_untied_head_is_packed_and_the_embedding_stays(tiny_model_dirs, tmp_path):
    path, _ = tiny_model_dirs["llama_untied"]
    q = _load(path, head_bits=8)
    assert isinstance(q.lm_head, SQLoRALinear) and q.lm_head.bits == 8
    assert type(q.model.embed_tokens) is nn.Embedding
    rep = sqlora_hf.report(q)
    assert rep["output_head"]["name"] == "lm_head" and "lm_head" not in rep["layers"]
    assert rep["bits_per_weight"] < 5  # the int8 head is not averaged into the transformer layers
    q.save_pretrained(tmp_path / "q")
    again = _load(tmp_path / "q")
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, q(ids).logits)


def test_head_bits_with_calibrated_compression(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path)
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    sqlora_hf.compress(model, SQLoRAConfig(rank=0, head_bits=8, calibration_samples=4, calibration_seq_len=16), calib)
    assert isinstance(model.lm_head, SQLoRALinear) and isinstance(model.model.embed_tokens, PackedEmbedding)


@pytest.mark.parametrize("value", [4, 16, True, "8"])
def test_bad_head_bits_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"head_bits=.*allowed: None, 8"):
        SQLoRAConfig(head_bits=value)


def test_head_bits_round_trips_through_config_json(tiny_model_dirs, tmp_path):
    q = _load(tiny_model_dirs["llama"][0], rank=0, head_bits=8)
    q.save_pretrained(tmp_path / "q")
    saved = json.load(open(os.path.join(tmp_path, "q", "config.json")))
    assert saved["quantization_config"]["head_bits"] == 8 and saved["tie_word_embeddings"] is False


def test_lora_training_on_a_model_with_a_packed_tied_head(tiny_model_dirs):
    from peft import get_peft_model

    model = _load(tiny_model_dirs["llama"][0], rank=0, head_bits=8)
    sqlora_hf.peft_integration.gradient_checkpointing_recipe(model)
    config = sqlora_hf.lora_config(model, r=8, lora_alpha=16, target_modules="all-linear")
    assert "lm_head" not in config.target_modules  # the head is never an adapter target
    head_bytes = model.lm_head.qcodes.clone()
    peft_model = get_peft_model(model, config)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(6):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.95 * losses[0], losses
    assert torch.equal(model.lm_head.qcodes, head_bytes)


def test_a_tied_embedding_subclass_keeps_its_weight(tiny_model_dirs, tmp_path):
    """An embedding that does more than a lookup (e.g. Gemma's scaled one) is not replaced."""
    from transformers import AutoModelForCausalLM

    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"][0])
    old = model.model.embed_tokens
    scaled = ScaledEmbedding(old.num_embeddings, old.embedding_dim)
    scaled.weight = old.weight  # still tied to the head
    model.model.embed_tokens = scaled
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        before = model.model.embed_tokens(ids)
    from sqlora_hf.output_head import compress_output_head

    assert compress_output_head(model, SQLoRAConfig(head_bits=8)) == "lm_head"
    assert model.model.embed_tokens is scaled and isinstance(model.lm_head, SQLoRALinear)
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens(ids), before)
