"""`SQLoRAHfQuantizer`: the transformers 5 glue (see ../shared/reference/hf-integration.md).

Two paths:
- quantize while loading: each Linear becomes an `SQLoRALinear` with a meta `weight` slot; the
  loader hands each fp weight to `SQLoRAQuantize.convert`, which compresses it and installs the
  packed tensors. Only one fp weight is alive at a time.
- load a pre-quantized checkpoint: the packed buffers are allocated on meta with the shapes and
  dtypes read from the safetensors headers, so keys load one to one; after loading every layer is
  validated against docs/format.md, so a broken checkpoint is an error, never garbage.
"""
from __future__ import annotations

import copy
import logging as _pylogging
import os
from typing import Any, Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer, get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils import logging as hf_logging

from .calibration import can_generate_text, is_self
from .compression import CompressionSpec, compress_weight
from .config import SQLoRAConfig
from .formats.layer import FormatError, layout_problem
from .nn.embedding import PackedEmbedding
from .nn.linear import PACKED_NAMES, SQLoRALinear
from .output_head import bind_packed_embedding, compress_output_head

logger = hf_logging.get_logger("sqlora_hf")
_pylogging.getLogger("sqlora_hf")  # so users can raise/lower it like any logger


def compression_spec(config: SQLoRAConfig) -> CompressionSpec:
    return CompressionSpec(bits=config.bits, group_size=config.group_size, sparsity=config.sparsity, rank=config.rank,
                           rank_rule=config.rank_rule, qa_iterations=config.qa_iterations,
                           scale_search=config.uses_scale_search(calibrated=False))


def modules_to_skip(model: nn.Module, config: SQLoRAConfig) -> list[str]:
    """The user's list plus what must always stay uncompressed: tied weights, the output head, fp32 keeps."""
    skip = list(config.modules_to_not_convert or [])
    skip += get_keys_to_not_convert(model)
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(skip))


def replace_linears(model: nn.Module, config: SQLoRAConfig, skip: list[str],
                    packed_prefixes: Optional[set[str]] = None) -> list[str]:
    """Swap every eligible Linear/Conv1D (on meta) for an `SQLoRALinear`; returns the names swapped.

    With `packed_prefixes` (pre-quantized load) exactly those modules are swapped: the checkpoint
    decides. Otherwise the config's rules do, and layers whose shape the format cannot pack stay
    as they are, with a warning.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, Conv1D)) or isinstance(module, SQLoRALinear):
            continue
        transposed = isinstance(module, Conv1D)
        if transposed:
            in_f, out_f = module.weight.shape
        else:
            in_f, out_f = module.in_features, module.out_features
        if packed_prefixes is not None:
            if name not in packed_prefixes:
                continue
        else:
            if not should_convert_module(name, skip):
                continue
            problem = layout_problem(config.bits, config.group_size, config.sparsity, in_f)
            if problem:
                logger.warning(f"sqlora: leaving {name} uncompressed: {problem}")
                continue
        new = SQLoRALinear(
            in_f, out_f, bias=module.bias is not None,
            compute_dtype=config.torch_compute_dtype, backend=config.backend,
            transposed_source=transposed, device="meta",
            dtype=module.bias.dtype if module.bias is not None else None,
        )
        model.set_submodule(name, new)
        swapped.append(name)
    return swapped


def _in_features(module: nn.Module) -> int:
    """A Linear's in_features; GPT-2's Conv1D stores its weight `[in, out]`."""
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features


def check_rank_fits(rank: Any, layers: list[tuple[str, nn.Module]]) -> None:
    """A fixed rank larger than min(out, in) of a layer is refused before minutes of loading or sampling."""
    if not (isinstance(rank, int) and rank > 0):
        return
    shapes = [(n, m.weight.shape[1] if isinstance(m, Conv1D) else m.out_features, _in_features(m)) for n, m in layers]
    too_small = [(n, out_f, in_f) for n, out_f, in_f in shapes if min(out_f, in_f) < rank]
    if too_small:
        n, out_f, in_f = too_small[0]
        raise ValueError(f"SQLoRAConfig.rank={rank} is larger than {len(too_small)} layer(s) allow; first: {n} "
                         f"({out_f} x {in_f}) allows at most {min(out_f, in_f)}. Use a smaller rank or rank='auto'")


def refuse_calibration_record(calibration: Any) -> None:
    """A config read back from a saved model keeps only the record of its calibration data. Compressing a
    float model with it would silently be data-free while config.json went on claiming the calibration."""
    if isinstance(calibration, dict):
        raise ValueError(
            f"SQLoRAConfig.calibration holds only the record of a past calibration ({calibration.get('source', '?')}, "
            f"sha256 {str(calibration.get('sha256', ''))[:12]}...), not the data: pass the data again (or 'self') "
            "to recompress, or calibration=None to compress data-free")


def nothing_to_compress(model: nn.Module, config: SQLoRAConfig, skip: list[str]) -> str:
    """Why no layer of `model` can be compressed with `config`: a config that would leave the whole model
    uncompressed is an error, not a "sqlora" model of 0 layers."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    if not linears:
        return f"sqlora found no Linear layer to compress in this {type(model).__name__}"
    kept = [n for n, _ in linears if should_convert_module(n, skip)]
    if not kept:
        return (f"sqlora found no layer to compress: all {len(linears)} Linear layers are skipped "
                f"(modules_to_not_convert, the output head and tied weights; first: {linears[0][0]})")
    in_features = {n: _in_features(m) for n, m in linears}
    first = kept[0]
    problem = layout_problem(config.bits, config.group_size, config.sparsity, in_features[first])
    sizes = sorted({in_features[n] for n in kept})
    return (f"sqlora found no layer to compress: none of the {len(kept)} eligible Linear layers can be packed with "
            f"group_size={config.group_size}, sparsity={config.sparsity!r} (first: {first}: {problem}; their "
            f"in_features are {sizes}); choose a group_size (32, 64, 128 or 256) that divides them")


def read_packed_headers(checkpoint_files: list[str]) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """{module prefix: {buffer name: (shape, dtype)}} for every packed tensor in the checkpoint, read
    from the safetensors headers without loading data."""
    from safetensors import safe_open

    out: dict[str, dict[str, Any]] = {}
    for path in checkpoint_files or []:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"sqlora checkpoints are safetensors only; got {path}")
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                prefix, _, leaf = key.rpartition(".")
                if leaf in PACKED_NAMES:
                    sl = handle.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise FormatError(f"{key} has dtype {sl.get_dtype()}, which the sqlora format never uses")
                    out.setdefault(prefix, {})[leaf] = (tuple(sl.get_shape()), dtype)
    return out


def checkpoint_keys(checkpoint_files: list[str]) -> set[str]:
    """Every tensor name in the checkpoint (headers only)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for path in checkpoint_files or []:
        with safe_open(path, framework="pt") as handle:
            keys.update(handle.keys())
    return keys


_SAFETENSORS_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool,
}


class SQLoRAQuantize(ConversionOps):
    """Compress one fp weight as it is loaded and write the packed tensors into its module."""

    def __init__(self, quantizer: "SQLoRAHfQuantizer") -> None:
        self.quantizer = quantizer

    def convert(self, input_dict: dict[str, Any], model: Optional[nn.Module] = None,
                full_layer_name: Optional[str] = None, missing_keys=None, **kwargs) -> dict[str, torch.Tensor]:
        key, value = next(iter(input_dict.items()))
        tensor = value[0] if isinstance(value, list) else value
        name = full_layer_name or key
        module, _ = get_module_from_name(model, name)
        prefix = name.rsplit(".", 1)[0]
        try:
            weight = tensor.t() if module.transposed_source else tensor
            spec = self.quantizer.plan.get(prefix, self.quantizer.spec)
            packed = compress_weight(weight, spec, prefix)
            module.set_packed(packed)
        except Exception as err:
            # Raised here, transformers would bury it in a generic "issues during conversion" error;
            # recorded, it is raised by name once loading ends (_process_model_after_weight_loading).
            self.quantizer.errors[prefix] = str(err)
        finally:
            del tensor, input_dict
            self.quantizer.tick()
            release_freed_memory()
        if missing_keys is not None:
            missing_keys.discard(name)
        return {}


class SQLoRAHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: SQLoRAConfig, **kwargs: Any) -> None:
        # A copy: compression writes to its config (the calibration data becomes its record, rank_keep is
        # spent), and the caller's object must stay what they built, ready for the next from_pretrained.
        quantization_config = copy.copy(quantization_config)
        super().__init__(quantization_config, **kwargs)
        quantization_config.validate()  # a config edited after it was built (config.bits = 5) is checked too
        self.spec = compression_spec(quantization_config)
        self.errors: dict[str, str] = {}
        self.converted: list[str] = []
        self.plan: dict[str, CompressionSpec] = {}  # per-layer specs fixed by the memory-budget planner
        self._progress = None

    # ---- environment ---------------------------------------------------------------------------
    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and any(v == "disk" for v in device_map.values()):
            raise ValueError("sqlora: offloading compressed layers to disk is not supported; use cpu or a GPU")

    @property
    def quantized_element_size(self) -> float:
        return self.quantization_config.bits / 8

    # ---- before loading ------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        skip = modules_to_skip(model, self.quantization_config)
        self.modules_to_not_convert = skip
        if not self.pre_quantized:
            self.quantization_config.check_writable()
            refuse_calibration_record(self.quantization_config.calibration)
        if not self.pre_quantized and self.quantization_config.needs_calibration_run:
            # Calibrated compression needs whole blocks and their activations: load the fp model as
            # is and compress it block by block once loaded (_process_model_after_weight_loading).
            self.checkpoint_dir = os.path.dirname(checkpoint_files[0]) if checkpoint_files else None
            self.converted = []
            config = self.quantization_config
            if config.head_bits is None and not any(
                    should_convert_module(n, skip) and not layout_problem(config.bits, config.group_size, config.sparsity,
                                                                          _in_features(m))
                    for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))):
                raise ValueError(nothing_to_compress(model, config, skip))  # before loading the weights
            return model
        if not self.pre_quantized:
            self.converted = replace_linears(model, self.quantization_config, skip)
            if not self.converted and self.quantization_config.head_bits is None:
                raise ValueError(nothing_to_compress(model, self.quantization_config, skip))
            check_rank_fits(self.quantization_config.rank, [(n, model.get_submodule(n)) for n in self.converted])
            for name in self.converted:
                model.get_submodule(name).add_weight_slot(_meta_dtype(model))
            if self.quantization_config.memory_budget is not None:
                from .budget import plan_for_budget

                self.plan = plan_for_budget(model, self.quantization_config, self.converted, checkpoint_files)
            return model
        headers = read_packed_headers(checkpoint_files)
        self.converted = replace_linears(model, self.quantization_config, skip, packed_prefixes=set(headers))
        if self.quantization_config.head_bits is not None:  # only then is the checkpoint's key list needed
            bind_packed_embedding(model, checkpoint_keys(checkpoint_files), set(headers))
        for name in self.converted:
            shapes = headers[name]
            for required in ("qmeta", "qcodes", "qscales"):
                if required not in shapes:
                    raise FormatError(f"{name}.{required} is missing from the checkpoint")
            model.get_submodule(name).allocate(shapes)
        unknown = set(headers) - set(self.converted)
        if unknown:
            raise FormatError(
                f"the checkpoint holds packed tensors for modules that are not Linear layers of this model: "
                f"{sorted(unknown)[:5]}"
            )
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return tensor_name == "weight" and isinstance(module, SQLoRALinear)

    def get_quantize_ops(self) -> SQLoRAQuantize:
        return SQLoRAQuantize(self)

    def tick(self) -> None:
        if self._progress is None:
            self._progress = hf_logging.tqdm(total=len(self.converted), desc="sqlora: compressing", unit="layer")
        self._progress.update(1)

    # ---- after loading -------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if not self.pre_quantized and self.quantization_config.needs_calibration_run:
            return self._compress_with_calibration(model)
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.errors:
            name, why = next(iter(self.errors.items()))
            why = why if why.startswith(name) else f"{name}: {why}"  # most messages already name the layer
            raise ValueError(f"sqlora could not compress {len(self.errors)} layer(s); first: {why}")
        for name in self.converted:
            module = model.get_submodule(name)
            if self.pre_quantized:
                for leaf in PACKED_NAMES:
                    t = getattr(module, leaf)
                    if t is not None and (t.device.type == "meta" or not getattr(t, "_is_hf_initialized", False)):
                        raise FormatError(f"{name}.{leaf} was not loaded from the checkpoint (missing or unreadable)")
            elif not module.is_packed:
                raise FormatError(f"{name}.weight was missing from the checkpoint, so the layer was never compressed")
            packed = module.packed()
            packed.validate(name)
            if (packed.out_features, packed.in_features) != (module.out_features, module.in_features):
                raise FormatError(
                    f"{name}: the checkpoint's packed layer is {packed.out_features} x {packed.in_features} "
                    f"(out x in features), but this model's layer is {module.out_features} x {module.in_features}; "
                    "the checkpoint does not belong to this model's config")
        from .budget import apply_elastic_rank

        apply_elastic_rank(model, self.quantization_config, self.converted, self.pre_quantized)
        if not self.pre_quantized:
            compress_output_head(model, self.quantization_config)
        return model

    def _compress_with_calibration(self, model):
        from .sequential import compress_model

        config = self.quantization_config
        tokenizer = config._tokenizer
        texts = _holds_texts(config.calibration)
        # an encoder's "self" calibration walks its token embeddings and needs the tokenizer too
        walks = is_self(config.calibration) and not can_generate_text(model)
        if tokenizer is None and self.checkpoint_dir and (texts or walks):
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(self.checkpoint_dir)
            except Exception as err:  # no tokenizer files beside the model
                if texts:
                    raise ValueError(
                        "SQLoRAConfig.calibration holds texts but no tokenizer was given and none could be loaded "
                        f"from {self.checkpoint_dir} ({type(err).__name__}); pass SQLoRAConfig(tokenizer=...)"
                    ) from None
                # walks without a tokenizer: calibration.self_walks says what to do
        compress_model(model, config, tokenizer=tokenizer)
        self.converted = [n for n, m in model.named_modules() if isinstance(m, SQLoRALinear)]
        return model

    # ---- capabilities --------------------------------------------------------------------------
    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """Every packed module back to a dense one of the class it replaced: `nn.Linear`, GPT-2's `Conv1D`
        (whose weight is stored `[in, out]`), and a `PackedEmbedding` (`head_bits`) an `nn.Embedding` with its
        own copy of the rows, so the saved checkpoint holds both matrices and reloads without sqlora_hf."""
        for name, module in list(model.named_modules()):
            if isinstance(module, PackedEmbedding):
                weight = module.dequantize(torch.float32)
                target = dtype or module.output_dtype
                dense_emb = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                                         device=weight.device, dtype=target)
                with torch.no_grad():
                    dense_emb.weight.copy_(weight.to(target))
                model.set_submodule(name, dense_emb)
        for name, module in list(model.named_modules()):
            if isinstance(module, SQLoRALinear):
                weight = module.dequantize(torch.float32)
                target = dtype or (module.bias.dtype if module.bias is not None else torch.float32)
                if module.transposed_source:
                    dense = Conv1D(module.out_features, module.in_features)
                    dense.to(device=weight.device, dtype=target)
                    if module.bias is None:
                        dense.bias = None
                    weight = weight.t()
                else:
                    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                      device=weight.device, dtype=target)
                with torch.no_grad():
                    dense.weight.copy_(weight.to(target))
                    if module.bias is not None:
                        dense.bias.copy_(module.bias.to(target))
                model.set_submodule(name, dense)
        return model


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise).

    Compressing one layer allocates and frees a few fp32 temporaries of the layer's size; without
    this, glibc's arenas keep them and resident memory creeps up layer after layer.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _holds_texts(data: Any) -> bool:
    if is_self(data):  # sampled from the model: no tokenizer needed
        return False
    return not isinstance(data, torch.Tensor) and not (isinstance(data, (list, tuple)) and data
                                                        and isinstance(data[0], torch.Tensor))


def _meta_dtype(model: nn.Module) -> Optional[torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None
