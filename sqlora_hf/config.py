"""`SQLoRAConfig`: what the user asks for, validated field by field when it is built.

Every error names the field, the value given and what is allowed, because a quantization config is
often built from JSON or a command line where a typo would otherwise surface as a wrong model.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats.layer import ALLOWED_BITS, ALLOWED_GROUP_SIZES, FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS

QUANT_METHOD = "sqlora"
ALLOWED_SPARSITY = (None, "2:4", "4:8")
DEFAULT_MEMORY_BUDGET = "auto"
HEAD_BITS = (8,)
# Coordinate-descent passes after each GPTQ sweep when `refine_passes` is None (docs/calibrated.md:
# on SmolLM2's real Hessians 2 passes lower the layer output errors by 2-7 %, 4 passes by 2-10 %).
DEFAULT_REFINE_PASSES = 2
# Whether calibrated GPTQ aims at the float model's outputs when `asymmetric_calibration` is None
# (SmolLM2, GPTQ-intrinsic under a budget: 4.25 bpw 1.056x -> 1.044-1.048x, 3.0 bpw 1.656x -> 1.504x).
DEFAULT_ASYMMETRIC_CALIBRATION = True
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _bad(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"SQLoRAConfig.{field}={value!r} is not valid; allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SQLoRAConfig(QuantizationConfigMixin):
    """Configuration of sqlora_hf compression.

    Args:
        bits: bit width of the quantized weights: 2 (a skewed 4-level table), 3, 4 (normal-float
            codebooks) or 8 (int8).
        group_size: input columns sharing one float16 scale: 32, 64, 128 or 256.
        sparsity: None (dense), "2:4" or "4:8" structured sparsity. Opt-in: it costs quality.
        rank: rank of the low-rank correction `L·R`: an int (0 = none) or "auto" (chosen per layer
            from the spectrum of the quantization residual).
        modules_to_not_convert: module names or patterns left uncompressed (transformers' matching
            rules). Embeddings and the output head stay uncompressed unless `head_bits=8` packs the
            head (and a tied embedding reads its rows from it).
        compute_dtype: dtype of the matmul: None (the activations' dtype), "float32", "float16",
            "bfloat16".
        backend: kernel backend: "auto" (fastest available) or a registered name such as "reference".
        format_version: version of the packed format (docs/format.md): compression writes the current
            one (3); a checkpoint of an older version (1, 2) is read with its own codebooks.
        memory_budget: "auto" (default: the nominal bits per weight of `bits`/`group_size`, e.g. 4.25
            for 4-bit groups of 64, plus a pinned int `rank`'s bytes; the planner keeps `bits`, may only
            coarsen groups to pay for metadata, and buys rank where it pays; with calibration the
            layout is the same uniform one and `rank="auto"` means rank 0, with no planning pass),
            None (every layer exactly at `bits`/`group_size`), an int number of bytes or a size
            string ("320MB", "1.5GiB") for the whole model, everything counted, or "3.25bpw" (average
            bits per weight over the compressed layers, as `report()` counts them). With a budget the
            checkpoint is planned before loading: each layer gets one of `tiers` × group sizes × ranks,
            chosen so the total fits and the summed estimated error is least.
            On reload of a saved model, a budget smaller than the model truncates the corrections.
        tiers: bit widths the budget planner may give a layer besides `bits` under an explicit budget
            (not under "auto", where it keeps `bits`) (default (3, 4, 8): NF3 where a layer
            tolerates it, NF4 for the bulk, int8 where outliers dominate the error).
        rank_rule: how `rank="auto"` picks ranks: "residual" (energy of the quantization residual
            per byte; default) or "stable" (SQ-LoRA's stable-rank bound on W).
        qa_iterations: rounds of quantization-aware SVD (0 = plain SVD of the residual).
        scale_search: search MSE-better group scales near absmax (True) or use absmax (False).
            None (the default) picks per path from SmolLM2 measurements: off for data-free
            compression (the lower weight MSE of searched scales raised perplexity) and on for
            calibrated GPTQ (there it lowered perplexity at 4.25 bpw: 1.086x -> 1.081x fp32 with
            64 calibration samples, 1.074x -> 1.062x with 128).
        refine_passes: passes of coordinate descent on the codes after each GPTQ sweep (calibrated
            compression only; scales and sparsity masks stay as GPTQ chose them). Each pass revisits
            every weight with all the others fixed and can only lower the layer's output error
            (docs/calibrated.md). None (the default) means DEFAULT_REFINE_PASSES; 0 turns it off.
        asymmetric_calibration: calibrated compression fits each layer, fed the compressed model's
            inputs, to the *float* model's outputs (GPTAQ), so later layers undo part of the error of
            earlier ones; costs one more forward pass of each block and a cross product per Linear.
            None (the default) means DEFAULT_ASYMMETRIC_CALIBRATION.
        rank_keep: elastic rank: keep this fraction (0, 1] of every layer's correction directions,
            applied at load (also when reloading a saved model: see docs/algorithms.md).
        calibration: optional calibration data (a list of texts, a `datasets.Dataset` with a "text"
            column, or token-id tensors), or "self": calibration text sampled from the model itself
            (causal LMs; no data needed, slower than data-free compression). With it, compression is
            activation aware (GPTQ with the low-rank term fitted to the data) and runs after the fp
            model has loaded. Only a record of it (source, samples, length, sha256) is written to
            config.json.
        calibration_samples: number of calibration windows (default 128; 64 with "self"; 2048 with "self"
            on a model that cannot generate, e.g. an encoder).
        calibration_seq_len: tokens per window (default 512; 128 with "self"; 32 with "self" on a model
            that cannot generate).
        calibration_method: "intrinsic" (GPTQ-intrinsic LoRA), "eora" (GPTQ, then the whitened-SVD
            correction of the residual) or "gptq" (GPTQ, then a plain SVD correction).
        sparsity_criterion: with calibration and sparsity: "sparsegpt" (masks chosen inside the
            GPTQ sweep) or "wanda" (|w|·‖x‖, cheaper).
        head_bits: None (default: the output head stays as loaded, like every peer) or 8: pack the
            output head as int8 rows with group scales, after the other layers. A tied input embedding
            then reads its rows from the packed head, so the shared matrix is stored once in int8
            (SmolLM2-135M: 113 MB fp32 -> 29 MB) and decode reads a quarter of the head's bytes.
            Not counted in `memory_budget` or the report's `bits_per_weight` (see docs/format.md).
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        sparsity: Optional[str] = None,
        rank: Union[int, str] = "auto",
        modules_to_not_convert: Optional[list[str]] = None,
        compute_dtype: Optional[Union[str, torch.dtype]] = None,
        backend: str = "auto",
        format_version: int = FORMAT_VERSION,
        calibration: Any = None,
        calibration_samples: Optional[int] = None,
        calibration_seq_len: Optional[int] = None,
        calibration_method: str = "intrinsic",
        sparsity_criterion: str = "sparsegpt",
        tokenizer: Any = None,
        memory_budget: Union[None, int, str] = DEFAULT_MEMORY_BUDGET,
        tiers: Union[list, tuple] = (3, 4, 8),
        rank_rule: str = "residual",
        qa_iterations: int = 2,
        scale_search: Optional[bool] = None,
        refine_passes: Optional[int] = None,
        asymmetric_calibration: Optional[bool] = None,
        rank_keep: Optional[float] = None,
        head_bits: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        if kwargs:
            import inspect

            known = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "kwargs")]
            raise ValueError(f"SQLoRAConfig got unknown fields {sorted(kwargs)}; known fields: {', '.join(known)}")
        self.bits = bits
        self.group_size = group_size
        self.sparsity = sparsity
        self.rank = rank
        self.modules_to_not_convert = modules_to_not_convert
        self.compute_dtype = _dtype_name(compute_dtype)
        self.backend = backend
        self.format_version = format_version
        self.calibration = calibration
        # None: 128 x 512 for data the user passes, fewer for "self" (sampling the text is the slow part)
        from .calibration import SELF_SAMPLES, SELF_SEQ_LEN, is_self

        generated = is_self(calibration)
        # Not fields: which of the two the user gave. An encoder's "self" windows (walks over its token
        # embeddings) default to another shape than a causal LM's sampled ones (calibration.self_walks).
        self._calibration_samples_given = calibration_samples is not None
        self._calibration_seq_len_given = calibration_seq_len is not None
        self.calibration_samples = calibration_samples if calibration_samples is not None else (
            SELF_SAMPLES if generated else 128)
        self.calibration_seq_len = calibration_seq_len if calibration_seq_len is not None else (
            SELF_SEQ_LEN if generated else 512)
        self.calibration_method = calibration_method
        self.sparsity_criterion = sparsity_criterion
        # Not a field: a tokenizer object cannot go to config.json (see to_dict).
        self._tokenizer = tokenizer
        self.memory_budget = memory_budget
        self.tiers = tiers
        self.rank_rule = rank_rule
        self.qa_iterations = qa_iterations
        self.scale_search = scale_search
        self.refine_passes = refine_passes
        self.asymmetric_calibration = asymmetric_calibration
        self.rank_keep = rank_keep
        self.head_bits = head_bits
        self.post_init()

    def post_init(self) -> None:
        """Validate every field (also called again by `validate()` after edits)."""
        if not _is_int(self.bits) or self.bits not in ALLOWED_BITS:
            raise _bad("bits", self.bits, ", ".join(map(str, ALLOWED_BITS)))
        if not _is_int(self.group_size) or self.group_size not in ALLOWED_GROUP_SIZES:
            raise _bad("group_size", self.group_size, ", ".join(map(str, ALLOWED_GROUP_SIZES)))
        if self.sparsity not in ALLOWED_SPARSITY:
            raise _bad("sparsity", self.sparsity, 'None, "2:4", "4:8"')
        if self.sparsity is not None and self.group_size % 64:
            raise _bad("group_size", self.group_size, "64, 128 or 256 when sparsity is set")
        if not (self.rank == "auto" or (_is_int(self.rank) and self.rank >= 0)):
            raise _bad("rank", self.rank, '"auto" or an int >= 0 (0 = no low-rank correction)')
        m = self.modules_to_not_convert
        if m is not None and (not isinstance(m, (list, tuple)) or not all(isinstance(s, str) for s in m)):
            raise _bad("modules_to_not_convert", m, "None or a list of module names / patterns (strings)")
        if m is not None:
            self.modules_to_not_convert = list(m)
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise _bad("compute_dtype", self.compute_dtype, "None, " + ", ".join(COMPUTE_DTYPES))
        from . import kernels

        allowed_backends = ["auto", *kernels.backend_names()]
        if self.backend not in allowed_backends:
            raise _bad("backend", self.backend, ", ".join(allowed_backends))
        if not _is_int(self.format_version) or self.format_version < 1:
            raise _bad("format_version", self.format_version, f"an int in {list(SUPPORTED_FORMAT_VERSIONS)}")
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"SQLoRAConfig.format_version={self.format_version} is newer than this sqlora_hf understands "
                f"(it reads {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade sqlora_hf"
            )

        self._validate_calibration()
        self._validate_compression_science()

    def _validate_compression_science(self) -> None:
        from .compression.planner import parse_budget

        if self.memory_budget is not None:
            if parse_budget(self.memory_budget, "memory_budget").auto:  # raises naming the field
                self.memory_budget = DEFAULT_MEMORY_BUDGET  # " Auto " and "auto" are the same budget
        t = self.tiers
        if (not isinstance(t, (list, tuple)) or not t or not all(_is_int(b) and b in ALLOWED_BITS for b in t)):
            raise _bad("tiers", t, "a non-empty list of bit widths from " + ", ".join(map(str, ALLOWED_BITS)))
        self.tiers = sorted(set(t))
        if self.rank_rule not in ("residual", "stable"):
            raise _bad("rank_rule", self.rank_rule, '"residual", "stable"')
        if not _is_int(self.qa_iterations) or not 0 <= self.qa_iterations <= 10:
            raise _bad("qa_iterations", self.qa_iterations, "an int in 0 … 10")
        if self.scale_search is not None and not isinstance(self.scale_search, bool):
            raise _bad("scale_search", self.scale_search, "None (per path), True or False")
        if self.refine_passes is not None and (not _is_int(self.refine_passes) or not 0 <= self.refine_passes <= 20):
            raise _bad("refine_passes", self.refine_passes, "None (the default) or an int in 0 … 20")
        if self.asymmetric_calibration is not None and not isinstance(self.asymmetric_calibration, bool):
            raise _bad("asymmetric_calibration", self.asymmetric_calibration, "None (the default), True or False")
        if self.head_bits is not None and (not _is_int(self.head_bits) or self.head_bits not in HEAD_BITS):
            raise _bad("head_bits", self.head_bits, "None, " + ", ".join(map(str, HEAD_BITS)))
        k = self.rank_keep
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1):
            raise _bad("rank_keep", k, "None or a fraction in (0, 1]")

    def get_loading_attributes(self) -> dict[str, Any]:
        """Fields a user's config may change when reloading a saved model: the elastic rank (`rank_keep`,
        `memory_budget`) and how the packed layers run (`backend`, `compute_dtype`).

        transformers keeps the checkpoint's config on reload; for configs listed in its
        LOADING_ATTRIBUTES_CONFIG_TYPES it copies these attributes over from the user's one. Only fields
        the user set are copied, so `SQLoRAConfig(rank_keep=0.5)` leaves the saved backend alone.
        """
        out: dict[str, Any] = {}
        if self.rank_keep is not None:
            out["rank_keep"] = self.rank_keep
        if self.memory_budget != DEFAULT_MEMORY_BUDGET:
            out["memory_budget"] = self.memory_budget
        if self.backend != "auto":
            out["backend"] = self.backend
        if self.compute_dtype is not None:
            out["compute_dtype"] = self.compute_dtype
        return out

    def _validate_calibration(self) -> None:
        from .calibration import validate_calibration
        from .compression.calibrated import METHODS, SPARSITY_CRITERIA

        try:
            validate_calibration(self.calibration)
        except ValueError as err:
            raise ValueError(f"SQLoRAConfig.calibration={_short(self.calibration)} is not valid: "
                             f"{str(err).split(': ', 1)[-1]}") from None
        for field in ("calibration_samples", "calibration_seq_len"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise _bad(field, value, "an int >= 1")
        if self.calibration_method not in METHODS:
            raise _bad("calibration_method", self.calibration_method, ", ".join(METHODS))
        if self.sparsity_criterion not in SPARSITY_CRITERIA:
            raise _bad("sparsity_criterion", self.sparsity_criterion, ", ".join(SPARSITY_CRITERIA))

    def uses_scale_search(self, calibrated: bool) -> bool:
        """`scale_search` resolved for one path: None means on for calibrated GPTQ, off data-free."""
        return calibrated if self.scale_search is None else self.scale_search

    def resolved_refine_passes(self) -> int:
        """`refine_passes` with None resolved to the default."""
        return DEFAULT_REFINE_PASSES if self.refine_passes is None else self.refine_passes

    def check_writable(self) -> None:
        """Compression writes the current format version only; older versions are read, not written."""
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"SQLoRAConfig.format_version={self.format_version}: this sqlora_hf writes format version "
                f"{FORMAT_VERSION} (it reads {list(SUPPORTED_FORMAT_VERSIONS)}); leave format_version at its default "
                f"to compress a model"
            )

    def resolved_asymmetric_calibration(self) -> bool:
        """`asymmetric_calibration` with None resolved to the default."""
        if self.asymmetric_calibration is None:
            return DEFAULT_ASYMMETRIC_CALIBRATION
        return self.asymmetric_calibration

    @property
    def needs_calibration_run(self) -> bool:
        """True when calibration data (not just the record of a past run) is present."""
        return self.calibration is not None and not (isinstance(self.calibration, dict) and "sha256" in self.calibration)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: private attributes dropped, calibration data replaced by a record of it."""
        import copy

        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k != "calibration"}
        out = copy.deepcopy(out)
        out["calibration"] = _calibration_record(self.calibration)
        return out

    def validate(self) -> None:
        self.post_init()

    @property
    def torch_compute_dtype(self) -> Optional[torch.dtype]:
        return None if self.compute_dtype is None else COMPUTE_DTYPES[self.compute_dtype]


def _short(value: Any) -> str:
    text = " ".join(repr(value).split())  # one line (a Dataset's repr has several)
    return text if len(text) < 60 else text[:57] + "..."


def _calibration_record(data: Any) -> Any:
    """What config.json keeps of calibration data: a record, never the texts."""
    if data is None or (isinstance(data, dict) and "sha256" in data):
        return data
    import hashlib

    from .calibration import describe

    digest = hashlib.sha256(repr(data).encode() if not hasattr(data, "numpy") else data.numpy().tobytes()).hexdigest()
    return {"source": describe(data), "samples": None, "seq_len": None, "sha256": digest, "compressed": False}


def _dtype_name(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        for name, dt in COMPUTE_DTYPES.items():
            if dt == value:
                return name
        raise _bad("compute_dtype", value, "None, " + ", ".join(COMPUTE_DTYPES))
    if isinstance(value, str) and value.startswith("torch."):
        return value[len("torch."):]
    return value


def _accept_loading_attributes() -> None:
    """Let `from_pretrained(saved, quantization_config=SQLoRAConfig(rank_keep=...))` reach the loader.

    transformers ignores a user's config when the checkpoint has one, except for config classes in
    `LOADING_ATTRIBUTES_CONFIG_TYPES`, whose `get_loading_attributes()` it copies over.
    """
    from transformers.quantizers import auto

    types = getattr(auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple) and SQLoRAConfig not in types:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*types, SQLoRAConfig)


_accept_loading_attributes()
