"""SQLoRAConfig: every field validated with an error naming it; dict/JSON round trips."""
from __future__ import annotations

import json

import pytest
import torch

from sqlora_hf import SQLoRAConfig


def test_defaults_and_json_round_trip():
    cfg = SQLoRAConfig()
    assert cfg.quant_method == "sqlora" and cfg.bits == 4 and cfg.group_size == 64
    again = SQLoRAConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.to_dict() == cfg.to_dict()
    custom = SQLoRAConfig(bits=3, group_size=128, sparsity="4:8", rank=16, modules_to_not_convert=["mlp.down_proj"],
                          compute_dtype=torch.bfloat16, backend="reference")
    d = custom.to_dict()
    assert d["compute_dtype"] == "bfloat16"
    assert SQLoRAConfig(**json.loads(json.dumps(d))).to_dict() == d


@pytest.mark.parametrize("field,value", [
    ("bits", 5), ("bits", "4"), ("bits", True), ("bits", 4.0),
    ("group_size", 48), ("group_size", -1), ("group_size", None),
    ("sparsity", "1:2"), ("sparsity", 0.5),
    ("rank", -1), ("rank", "full"), ("rank", 2.5),
    ("modules_to_not_convert", "lm_head"), ("modules_to_not_convert", [1, 2]),
    ("compute_dtype", "int8"), ("compute_dtype", torch.int8),
    ("backend", "tpu"),
    ("format_version", 0), ("format_version", "1"),
    ("refine_passes", -1), ("refine_passes", 1.5), ("refine_passes", True), ("refine_passes", 99),
    ("asymmetric_calibration", 1), ("asymmetric_calibration", "yes"),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError) as err:
        SQLoRAConfig(**{field: value})
    msg = str(err.value)
    assert f"SQLoRAConfig.{field}" in msg and "allowed" in msg, msg


def test_newer_format_version_is_refused_with_upgrade_hint():
    with pytest.raises(ValueError, match="format_version=99 is newer.*upgrade"):
        SQLoRAConfig(format_version=99)


def test_sparsity_needs_group_multiple_of_64():
    with pytest.raises(ValueError, match="group_size"):
        SQLoRAConfig(sparsity="2:4", group_size=32)


def test_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="unknown fields.*bitz"):
        SQLoRAConfig(bitz=4)


def test_scale_search_default_depends_on_the_path():
    """None: searched scales for calibrated GPTQ only; an explicit choice holds on both paths."""
    assert SQLoRAConfig().uses_scale_search(calibrated=True) is True
    assert SQLoRAConfig().uses_scale_search(calibrated=False) is False
    for choice in (True, False):
        cfg = SQLoRAConfig(scale_search=choice)
        assert cfg.uses_scale_search(calibrated=True) is choice
        assert cfg.uses_scale_search(calibrated=False) is choice


def test_refine_passes_default_and_choice():
    from sqlora_hf.config import DEFAULT_REFINE_PASSES

    assert SQLoRAConfig().resolved_refine_passes() == DEFAULT_REFINE_PASSES
    assert SQLoRAConfig(refine_passes=0).resolved_refine_passes() == 0
    assert SQLoRAConfig.from_dict(SQLoRAConfig(refine_passes=3).to_dict()).resolved_refine_passes() == 3


def test_asymmetric_calibration_default_and_choice():
    from sqlora_hf.config import DEFAULT_ASYMMETRIC_CALIBRATION

    assert SQLoRAConfig().resolved_asymmetric_calibration() is DEFAULT_ASYMMETRIC_CALIBRATION
    for value in (True, False):
        again = SQLoRAConfig.from_dict(SQLoRAConfig(asymmetric_calibration=value).to_dict())
        assert again.resolved_asymmetric_calibration() is value


def test_memory_budget_auto_is_normalised():
    """ "auto " validated as "auto" but was stored as given, and a reload compared it with the literal "auto"."""
    assert SQLoRAConfig(memory_budget="auto ").memory_budget == "auto"
    assert SQLoRAConfig(memory_budget=" auto").to_dict()["memory_budget"] == "auto"


@pytest.mark.parametrize("field,value,needle", [("bits", 5, "bits=5"), ("group_size", 48, "group_size=48"),
                                                ("rank", -2, "rank=-2"), ("sparsity", "1:2", "sparsity='1:2'")])
def test_a_config_edited_after_it_was_built_is_validated_when_used(tiny_model_dirs, field, value, needle):
    from transformers import AutoModelForCausalLM

    config = SQLoRAConfig()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=rf"SQLoRAConfig\.{needle} is not valid"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"][0], quantization_config=config)
