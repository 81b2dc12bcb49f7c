"""sqlora_hf: mixed-bit, sparse, low-rank compression as a Hugging Face quantizer plugin.

Importing this package registers the "sqlora" quantization method with transformers, so
`from_pretrained(..., quantization_config=SQLoRAConfig())` compresses a model and
`from_pretrained(saved_dir)` reloads a compressed one.
"""
from __future__ import annotations

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .config import QUANT_METHOD, SQLoRAConfig
from .formats import FORMAT_VERSION, FormatError, PackedLayer
from .nn import SQLoRALinear
from .peft_integration import load_adapter, lora_config, merge_and_unload, register_peft
from .quantizer import SQLoRAHfQuantizer
from .report import report
from .hub import push_to_hub

__version__ = "0.1.0"

# Registering twice raises in transformers; importing twice is harmless because modules are cached,
# but a reload (importlib.reload, some notebook tools) must not crash.
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(SQLoRAConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(SQLoRAHfQuantizer)

__all__ = ["FORMAT_VERSION", "FormatError", "PackedLayer", "SQLoRAConfig", "SQLoRAHfQuantizer", "SQLoRALinear",
           "__version__", "load_adapter", "lora_config", "merge_and_unload", "register_peft", "report"]
__all__.append("push_to_hub")


def compress(model, config: SQLoRAConfig, calibration_data=None, tokenizer=None):
    """Compress a model already in memory, with calibration data (block by block, GPTQ-based).

    `calibration_data` overrides `config.calibration`; texts need `tokenizer`. The model is changed
    in place and returned; `save_pretrained` then writes an ordinary sqlora checkpoint.
    """
    import copy

    from .quantizer import SQLoRAHfQuantizer, refuse_calibration_record
    from .sequential import compress_model

    if calibration_data is None:
        refuse_calibration_record(config.calibration)
        if not config.needs_calibration_run:
            raise ValueError("sqlora_hf.compress needs calibration data: pass calibration_data=... or "
                             "SQLoRAConfig(calibration=...)")
    config = copy.copy(config)  # the caller's config is left as built (its data is not replaced by a record)
    config.validate()
    compress_model(model, config, calibration_data, tokenizer or config._tokenizer)
    # marked as a from_pretrained-quantized model is: model.dequantize() and transformers' checks work
    model.hf_quantizer = SQLoRAHfQuantizer(model.config.quantization_config, pre_quantized=True)
    model.is_quantized = True
    model.config._is_quantized = True
    return model
