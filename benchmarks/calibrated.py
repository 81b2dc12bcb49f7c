"""Calibrated compression of SmolLM2-135M: data-free vs GPTQ vs GPTQ+EoRA vs GPTQ-intrinsic LoRA.

    python3 benchmarks/calibrated.py [--quick] [--rows 0,3] [--samples 128] [--json out.json]

Evaluation text: the first 250k characters of `reference_text()` (the Python docs topics shipped
with CPython). Calibration text: `calibration_texts()`, the standard library's docstrings, so the
two are disjoint. Rows are compared at equal bits: each row gives a `memory_budget` (average bits
per weight, everything counted) and the planner picks every layer's bits, group size and rank
under it (data-free rows with weight errors, calibrated rows with activation-weighted errors).
Reports bits per weight, perplexity ratio to the fp32 model, compression time and peak memory
growth of the compression step. Peak growth is read from the process's high-water mark, so it is
only meaningful for the first row of a process: run one row per process (`--rows N`) to measure it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# Python puts this folder first on sys.path, where benchmarks/kernels.py would shadow the `kernels`
# package that transformers imports (its hub-kernels integration): take the folder off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch

import sqlora_hf
from sqlora_hf import SQLoRAConfig
from sqlora_hf.evaluation import calibration_texts, perplexity, reference_text, save_smollm2

LOW_TIERS = [2, 3, 4, 8]  # budgets at or below 3 bpw need 2-bit layers to be reachable at all
ROWS = [
    # label, method (None: data-free), memory budget (None: one fixed layout), tiers, rank, sparsity
    ("data-free 4.25bpw", None, "4.25bpw", [3, 4, 8], "auto", None),
    ("GPTQ 4.25bpw", "gptq", "4.25bpw", [3, 4, 8], 0, None),
    ("GPTQ+EoRA 4.25bpw", "eora", "4.25bpw", [3, 4, 8], "auto", None),
    ("GPTQ-intrinsic 4.25bpw", "intrinsic", "4.25bpw", [3, 4, 8], "auto", None),
    ("data-free 3.0bpw", None, "3.0bpw", LOW_TIERS, "auto", None),
    ("GPTQ 3.0bpw", "gptq", "3.0bpw", LOW_TIERS, 0, None),
    ("GPTQ+EoRA 3.0bpw", "eora", "3.0bpw", LOW_TIERS, "auto", None),
    ("GPTQ-intrinsic 3.0bpw", "intrinsic", "3.0bpw", LOW_TIERS, "auto", None),
    ("GPTQ-intrinsic 3.5bpw", "intrinsic", "3.5bpw", LOW_TIERS, "auto", None),
    ("GPTQ-intrinsic 2.5bpw", "intrinsic", "2.5bpw", LOW_TIERS, "auto", None),
    ("GPTQ-intrinsic 4-bit 4:8", "intrinsic", None, [4], "auto", "4:8"),
    ("GPTQ-intrinsic 4-bit 2:4", "intrinsic", None, [4], "auto", "2:4"),
    ("GPTQ 4-bit 4:8 (SparseGPT)", "gptq", None, [4], 0, "4:8"),
    ("data-free 4-bit 4:8", None, None, [4], "auto", "4:8"),
    # fixed layouts (no budget: bits = the single tier), to compare the corrections at equal bits
    ("GPTQ 3-bit g64", "gptq", None, [3], 0, None),
    ("GPTQ+EoRA 3-bit g64 r8", "eora", None, [3], 8, None),
    ("GPTQ-intrinsic 3-bit g64 r8", "intrinsic", None, [3], 8, None),
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="8 eval windows, 16 calibration samples of 256 tokens, 4.25 bpw rows (as defaults: "
                        "--samples, --seq-len and --windows given as well win)")
    p.add_argument("--samples", type=int, default=None, help="calibration samples (default 128; 16 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sample (default 512; 256 with --quick)")
    p.add_argument("--windows", type=int, default=None,
                   help="evaluation windows of 512 tokens (default 100, >= 50k tokens; 8 with --quick)")
    p.add_argument("--rows", default=None, help="comma-separated row numbers to run (default: all)")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/sqlora_hf/smollm2-135m-fp32"))
    p.add_argument("--scale-search", choices=["auto", "on", "off"], default="auto",
                   help="SQLoRAConfig.scale_search: auto = the default (None: on for calibrated rows, off data-free)")
    p.add_argument("--refine-passes", type=int, default=None,
                   help="SQLoRAConfig.refine_passes (coordinate descent after GPTQ); default: the config's default")
    p.add_argument("--asymmetric", choices=["auto", "on", "off"], default="auto",
                   help="SQLoRAConfig.asymmetric_calibration (fit layers to the float model's outputs); auto = default")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.scale_search = {"auto": None, "on": True, "off": False}[args.scale_search]
    args.asymmetric = {"auto": None, "on": True, "off": False}[args.asymmetric]
    quick = {"samples": 16, "seq_len": 256, "windows": 8} if args.quick else {"samples": 128, "seq_len": 512, "windows": 100}
    for name, default in quick.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    rows = ROWS if not args.quick else ROWS[:4]
    if args.rows:
        rows = [ROWS[int(i)] for i in args.rows.split(",")]

    directory = save_smollm2(args.cache)
    tok = AutoTokenizer.from_pretrained(directory)
    eval_ids = tok(reference_text()[:250_000], return_tensors="pt").input_ids[0]
    calib_texts = calibration_texts()
    fp = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    base = perplexity(fp, eval_ids, 512, args.windows)
    del fp
    print(f"fp32 perplexity {base:.3f} over {args.windows * 512} tokens; calibration {args.samples} x {args.seq_len}")
    results = []
    print(f"{'method':30}{'bpw':>8}{'ppl':>10}{'ratio':>8}{'time s':>9}{'peak +MB':>10}")
    for label, method, budget, tiers, rank, sparsity in rows:
        bits = 4 if budget is not None else tiers[0]
        cfg = SQLoRAConfig(bits=bits, group_size=64, sparsity=sparsity, rank=rank, memory_budget=budget, tiers=tiers,
                           scale_search=args.scale_search, refine_passes=args.refine_passes,
                           asymmetric_calibration=args.asymmetric)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        before = _rss_mb()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        start = time.perf_counter()
        if method is None:
            del model
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, quantization_config=cfg)
        else:
            cfg.calibration_samples, cfg.calibration_seq_len, cfg.calibration_method = args.samples, args.seq_len, method
            sqlora_hf.compress(model, cfg, calib_texts, tokenizer=tok)
        elapsed = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        rep = sqlora_hf.report(model)
        ppl = perplexity(model, eval_ids, 512, args.windows)
        row = {"method": label, "memory_budget": budget, "sparsity": sparsity, "bits_per_weight": rep["bits_per_weight"],
               "perplexity": ppl, "ratio": ppl / base, "seconds": elapsed,
               "peak_growth_mb": max(peak - max(before, peak_before), 0.0)}
        results.append(row)
        print(f"{label:30}{row['bits_per_weight']:8.3f}{ppl:10.3f}{row['ratio']:8.3f}{elapsed:9.1f}{row['peak_growth_mb']:10.0f}",
              flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "fp32_perplexity": base, "windows": args.windows,
                       "samples": args.samples, "seq_len": args.seq_len, "scale_search": args.scale_search,
                       "refine_passes": cfg.resolved_refine_passes(),
                       "asymmetric_calibration": cfg.resolved_asymmetric_calibration(),
                       "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
