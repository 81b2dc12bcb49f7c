"""The model card (README.md) of a pushed model, rendered from `model_cards/sqlora_model_card.md`.

The card is built only from the model's own report and config (no dates, no paths, no tokens), so
pushing an unchanged model renders byte-identical text and the Hub sees nothing to commit.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..config import QUANT_METHOD
from .checkpoint import PIPELINE_TAGS, model_class_name

logger = logging.getLogger("sqlora_hf")

TEMPLATE_NAME = "sqlora_model_card.md"
PLOT_FILE = "sqlora_allocation.png"
LIBRARY_NAME = "transformers"


def template_path() -> Path:
    """Where the card template is: inside the installed package when packaged as package data
    (`sqlora_hf/model_cards/`), else in the source checkout next to the package (`model_cards/`)."""
    package_root = Path(__file__).resolve().parents[1]
    for candidate in (package_root / "model_cards" / TEMPLATE_NAME, package_root.parent / "model_cards" / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the model card template {TEMPLATE_NAME} is missing from this sqlora_hf installation "
        f"(looked in {package_root / 'model_cards'} and {package_root.parent / 'model_cards'}); reinstall sqlora_hf"
    )


@dataclass
class CardInfo:
    """What the card says beyond the report: where the model came from and how good it is.

    `quality` maps a metric name to its value, e.g. `{"perplexity (wikitext-2, ctx 512)": 12.31,
    "perplexity of the base model": 11.98}`; values are shown as given (floats with 4 significant
    digits). `quality_note` is one free sentence shown under the table (the protocol, the data).
    """

    repo_id: str
    base_model: Optional[str] = None
    license: Optional[str] = None
    quality: Optional[Mapping[str, Union[float, int, str]]] = None
    quality_note: Optional[str] = None
    has_tokenizer: bool = False
    plot_file: Optional[str] = PLOT_FILE
    extra_tags: list[str] = field(default_factory=list)


def usage_snippet(repo_id: str, auto_class: str, has_tokenizer: bool) -> str:
    """Python that loads the pushed model; the tests run it against a local Hub."""
    lines = [
        "import sqlora_hf  # registers the 'sqlora' quantizer: transformers cannot load this model without it",
        f"from transformers import {auto_class}" + (", AutoTokenizer" if has_tokenizer else ""),
        "",
        f'model = {auto_class}.from_pretrained("{repo_id}")',
    ]
    if has_tokenizer:
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
        if auto_class == "AutoModelForCausalLM":
            lines += [
                'inputs = tokenizer("Compression lets a language model", return_tensors="pt")',
                "output = model.generate(**inputs, max_new_tokens=20, do_sample=False)",
                "print(tokenizer.decode(output[0], skip_special_tokens=True))",
            ]
    lines.append("print(sqlora_hf.report(model)['bits_per_weight'])")
    return "\n".join(lines)


def build_model_card(report: Mapping[str, Any], quant_config: Mapping[str, Any], model_config: Mapping[str, Any],
                     info: CardInfo, version: str) -> ModelCard:
    """Render the card. `report` is `sqlora_hf.report(model)`; the configs are plain dicts
    (`config.json`'s content and its `quantization_config`)."""
    auto_class = model_class_name(dict(model_config))
    base_model = _valid_repo_id_or_none(info.base_model, "base_model")
    card_data = ModelCardData(
        base_model=base_model,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAGS.get(auto_class),
        license=info.license or None,
        tags=sorted({QUANT_METHOD, "sqlora_hf", "quantized", "compressed", *info.extra_tags}),
    )
    layers = report.get("layers", {})
    has_tier = any(entry.get("tier") is not None for entry in layers.values())
    has_rel_error = any(relative_error(entry) is not None for entry in layers.values())
    ranks = sorted({entry["rank"] for entry in layers.values()})
    # What the layers hold (a merged adapter or a rank cut changes it), with the config's setting beside it.
    rank = quant_config.get("rank")
    setting = "" if rank is None or (len(ranks) == 1 and rank == ranks[0]) else f"config: rank={rank!r}"
    if ranks in ([], [0]):
        rank_setting = "none (rank 0" + (f"; {setting})" if setting else ")")
    else:
        rank_setting = f"rank {_span(ranks)}" + (" per layer" if len(ranks) > 1 else "") + (f" ({setting})" if setting else "")
    compressed_bytes = int(report.get("compressed_bytes", 0))
    weights = int(report.get("compressed_weights", 0))
    kwargs = dict(
        model_name=info.repo_id.split("/")[-1],
        base_model=base_model,
        sqlora_version=version,
        usage_snippet=usage_snippet(info.repo_id, auto_class, info.has_tokenizer),
        bits=quant_config.get("bits"),
        group_size=quant_config.get("group_size"),
        sparsity=quant_config.get("sparsity"),
        rank_setting=rank_setting,
        memory_budget=quant_config.get("memory_budget"),
        calibration=_calibration_text(quant_config),
        compressed_layers=report.get("compressed_layers", len(layers)),
        kept_uncompressed=", ".join(f"`{m}`" for m in quant_config.get("modules_to_not_convert") or [])
        or _kept_by_default(quant_config.get("head_bits")),
        format_version=quant_config.get("format_version", 1),
        total_size=_size(report.get("total_bytes", 0)),
        compressed_size=_size(compressed_bytes),
        fp16_size=_size(2 * weights),
        bits_per_weight=float(report.get("bits_per_weight", 0.0)),
        quality=[(str(k), _fmt(v)) for k, v in (info.quality or {}).items()],
        quality_note=info.quality_note,
        plot_file=info.plot_file,
        has_tier=has_tier,
        has_rel_error=has_rel_error,
        layers=[_layer_row(name, entry) for name, entry in layers.items()],
    )
    return ModelCard.from_template(card_data, template_path=str(template_path()), **kwargs)


def metadata_from_readme(path: str) -> dict[str, Any]:
    """Hub metadata (YAML header) of an existing README.md, or {} if there is none or it does not parse."""
    if not os.path.isfile(path):
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except Exception as err:  # a hand-written README with broken YAML must not block a push
        logger.warning(f"sqlora: ignoring the metadata of {path}: {err}")
        return {}


def relative_error(entry: Mapping[str, Any]) -> Optional[float]:
    """The layer's ||W - Ŵ - L·R||_F / ||W||_F from the report, when it was measured (not after a reload)."""
    value = entry.get("relative_error", entry.get("rel_error"))
    return None if value is None else float(value)


def _valid_repo_id_or_none(value: Optional[str], field_name: str) -> Optional[str]:
    if not value:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        logger.warning(f"sqlora: {field_name}={value!r} is not a Hub repo id; it is left out of the card metadata")
        return None
    return value


def _kept_by_default(head_bits) -> str:
    if head_bits:
        return (f"an untied input embedding (the output head is packed as int{head_bits} rows, `head_bits={head_bits}`, "
                "and a tied embedding reads its rows from it)")
    return "embeddings, output head and tied weights"


def _calibration_text(quant_config: Mapping[str, Any]) -> str:
    calibration = quant_config.get("calibration")
    if calibration:
        return f"yes ({calibration})" if isinstance(calibration, str) else "yes"
    return "none (data-free: only the weights were used)"


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _layer_row(name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    shape = entry.get("shape") or ["?", "?"]
    rel_error = relative_error(entry)
    return {
        "name": name,
        "shape": "×".join(str(s) for s in shape),
        "bits": entry.get("bits"),
        "group_size": entry.get("group_size"),
        "sparsity": entry.get("sparsity") or "dense",
        "rank": entry.get("rank"),
        "bits_per_weight": f"{float(entry.get('bits_per_weight', 0.0)):.3f}",
        "tier": entry.get("tier", "-"),
        "rel_error": "-" if rel_error is None else f"{float(rel_error):.4f}",
    }
