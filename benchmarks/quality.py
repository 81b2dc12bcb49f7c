"""Quality of data-free compression: SmolLM2-135M perplexity and all-MiniLM-L6-v2 embedding cosine.

Every sqlora row is compressed through the real path (`from_pretrained(..., quantization_config=...)`,
planner included), which gives the compression time and the report's bits per weight (everything
counted). Its quality is then measured on an fp copy of the model whose Linear weights are replaced by
the compressed layers' dense `Ŵ + L·R` (`SQLoRALinear.dequantize()`): the same function the packed
kernels compute, evaluated without dequantizing on every forward, so a row takes seconds, not minutes.

Text: `sqlora_hf.evaluation.reference_text()` (the Python docs topics shipped with CPython; real
English prose, about 110k SmolLM2 tokens). Perplexity in non-overlapping windows of 512 tokens;
`--windows 98` covers 50k tokens. The "asym g32" row simulates a 4-bit asymmetric quantizer with
groups of 32, which reproduces SmolLM2's own Q4_1 storage almost exactly: a sanity row only.

    python benchmarks/quality.py --quick                # 16 windows, the main rows
    python benchmarks/quality.py --windows 98 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone

# Python puts this folder first on sys.path, where benchmarks/kernels.py would shadow the `kernels`
# package that transformers imports (its hub-kernels integration): take the folder off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch

import sqlora_hf  # noqa: F401  (registers the quantizer)
from sqlora_hf import SQLoRAConfig
from sqlora_hf.evaluation import calibration_texts, minilm_path, perplexity, reference_text, save_smollm2
from sqlora_hf.nn.linear import SQLoRALinear
from sqlora_hf.report import report

MAIN_ROWS = {
    "RTN NF4 g64 (no planner, rank 0)": dict(memory_budget=None, rank=0, qa_iterations=0),
    "sqlora default (auto = 4.25 bpw)": dict(),
    "sqlora 3.5bpw": dict(memory_budget="3.5bpw"),
    "sqlora 3.25bpw": dict(memory_budget="3.25bpw"),
    "sqlora 3.0bpw (tiers 2,3,4,8)": dict(memory_budget="3.0bpw", tiers=[2, 3, 4, 8]),
}
ABLATION_ROWS = {
    "abl: tiers [4] only (grid/rank planner)": dict(tiers=[4]),
    "abl: rank 0 (tiers only)": dict(rank=0),
    "abl: stable-rank rule": dict(rank_rule="stable"),
    "abl: plain SVD (qa_iterations=0)": dict(qa_iterations=0),
    "abl: MSE scale search": dict(scale_search=True),
    "abl: uniform NF4 g64 rank 8, plain SVD": dict(memory_budget=None, rank=8, qa_iterations=0),
    "abl: uniform NF4 g64 rank 8, QA-SVD": dict(memory_budget=None, rank=8, qa_iterations=2),
    "abl: 2:4 NF4 g64 rank auto": dict(memory_budget=None, sparsity="2:4"),
    "abl: 4:8 NF4 g64 rank auto": dict(memory_budget=None, sparsity="4:8"),
}
# Not data-free in spirit only: no data is read, but the calibration text is sampled from the model itself
# (`calibration="self"`: each window starts from a random ordinary token, then plain sampling), then
# compressed with the calibrated (GPTQ) path. Minutes, not seconds, per row (sampling is the slow part);
# causal LMs only (so not run on MiniLM). The window count and length are spelled out per row.
SELF_ROWS = {
    # calibration="self" with its defaults: 64 windows x 128 tokens, the default "auto" budget (NF4 g64, at or
    # below 4.25 bpw, no planner pass), then the explicit-budget planner at the same size and at 3.25 bpw
    "sqlora self-calibrated, default (auto = 4.25 bpw), 64 x 128 sampled": dict(calibration="self"),
    "sqlora self-calibrated 4.25bpw planner, 64 x 128 sampled": dict(memory_budget="4.25bpw", calibration="self"),
    "sqlora self-calibrated 3.25bpw, 64 x 128 sampled": dict(memory_budget="3.25bpw", calibration="self"),
    # the same 8k tokens in 16 long windows (the default before 2026-12-07 evening)
    "sqlora self-calibrated, default (auto = 4.25 bpw), 16 x 512 sampled": dict(
        calibration="self", calibration_samples=16, calibration_seq_len=512),
    "sqlora self-calibrated 3.25bpw, 16 x 512 sampled": dict(memory_budget="3.25bpw", calibration="self",
                                                            calibration_samples=16, calibration_seq_len=512),
}
MINILM_ROWS = ["RTN NF4 g64 (no planner, rank 0)", "sqlora default (auto = 4.25 bpw)", "sqlora 3.25bpw"]
# MiniLM cannot sample its own text, so its calibrated rows read real text: 128 windows of 128 tokens of
# the standard library's docstrings (`calibration_texts()`, disjoint from the evaluation sentences). Not
# data-free; seconds per row on this small encoder.
# No data either: MiniLM cannot write text, so calibration="self" builds 2048 windows of 32 tokens as walks
# over its own token embeddings (sqlora_hf/embedding_walks.py); seconds per row.
MINILM_SELF_ROWS = {
    "self-calibrated, default (auto = 4.25 bpw), embedding walks": dict(calibration="self"),
    "self-calibrated 3.25bpw, embedding walks": dict(memory_budget="3.25bpw", calibration="self"),
}
MINILM_CALIBRATED_ROWS = {
    "calibrated 4.25bpw (128 x 128 stdlib docstrings)": dict(memory_budget="4.25bpw"),
    "calibrated 3.25bpw (128 x 128 stdlib docstrings)": dict(memory_budget="3.25bpw"),
}


def compressed_weights(directory: str, auto_class, config: SQLoRAConfig) -> tuple[dict, dict, float]:
    """({linear name: dense Ŵ+L·R}, report, seconds) of one real compressed load."""
    start = time.perf_counter()
    model = auto_class.from_pretrained(directory, dtype=torch.float32, quantization_config=config)
    seconds = time.perf_counter() - start
    weights = {n: m.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, SQLoRALinear)}
    summary = report(model)
    del model
    return weights, summary, seconds


def install(model: torch.nn.Module, weights: dict, originals: dict) -> None:
    """Put compressed weights (or the originals back) into the fp model."""
    with torch.no_grad():
        for name, w in originals.items():
            model.get_submodule(name).weight.copy_(weights.get(name, w))


def asym_g32(weight: torch.Tensor) -> torch.Tensor:
    """4-bit asymmetric min/max quantization in groups of 32 (simulated; SmolLM2's own Q4_1 grid)."""
    n, k = weight.shape
    g = weight.view(n, k // 32, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).clamp_min(1e-12)
    return (((g - lo) / step).round().clamp(0, 15) * step + lo).view(n, k)


def sentences(count: int) -> list[str]:
    text = re.sub(r"\s+", " ", reference_text())
    out = [s.strip() for s in re.split(r"(?<=[.!?]) ", text) if 40 <= len(s.strip()) <= 300]
    return out[:count]


@torch.no_grad()
def embed(model, tok, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 32):
        batch = tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=None,
                        help="perplexity windows of 512 tokens (default 98 = 50k tokens; 16 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="16 windows, 100 sentences, main rows only (--windows / --sentences given as well win)")
    parser.add_argument("--ablations", action="store_true", help="also run the ablation rows")
    parser.add_argument("--self-calibrated", action="store_true",
                        help="also run the rows calibrated on text sampled from the model itself (minutes each)")
    parser.add_argument("--sentences", type=int, default=None, help="MiniLM sentences (default 300; 100 with --quick)")
    parser.add_argument("--cache", default="/tmp/sqlora_bench", help="where the fp checkpoints are written once")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default=None,
                        help="only SmolLM2 rows whose label contains one of these comma-separated words (the MiniLM "
                             "rows always run; a word no label has, e.g. NONE, leaves MiniLM only)")
    args = parser.parse_args()
    if args.windows is None:
        args.windows = 16 if args.quick else 98
    if args.sentences is None:
        args.sentences = 100 if args.quick else 300
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    smol_dir = save_smollm2(os.path.join(args.cache, "smollm2"))
    tok = AutoTokenizer.from_pretrained(smol_dir)
    ids = tok(reference_text(), return_tensors="pt").input_ids[0]
    fp = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    originals = {n: m.weight.detach().clone() for n, m in fp.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "machine": platform.platform(),
               "cpus": os.cpu_count(), "threads": args.threads, "windows": args.windows,
               "tokens": args.windows * 512, "text": "sqlora_hf.evaluation.reference_text() (CPython pydoc topics)",
               "smollm2": {}, "minilm": {}}
    base = perplexity(fp, ids, 512, args.windows)
    results["smollm2"]["fp32"] = {"ppl": base, "ratio": 1.0, "bpw": 32.0}
    print(f"{'row':44s} {'bpw':>6s} {'ppl':>8s} {'x fp':>6s} {'time s':>7s}", flush=True)
    print(f"{'fp32':44s} {32.0:6.2f} {base:8.3f} {1.0:6.3f} {'-':>7s}", flush=True)
    install(fp, {n: asym_g32(w) for n, w in originals.items()}, originals)
    p = perplexity(fp, ids, 512, args.windows)
    results["smollm2"]["sanity: asym 4-bit g32 (SmolLM2's own grid)"] = {"ppl": p, "ratio": p / base, "bpw": 4.5}
    print(f"{'sanity: asym 4-bit g32 (SmolLM2 own grid)':44s} {4.5:6.2f} {p:8.3f} {p / base:6.3f} {'-':>7s}", flush=True)
    rows = dict(MAIN_ROWS)
    if args.ablations:
        rows.update(ABLATION_ROWS)
    if args.self_calibrated:
        rows.update(SELF_ROWS)
    all_rows = dict(rows)
    if args.rows:
        words = args.rows.split(",")
        rows = {k: v for k, v in rows.items() if any(w in k for w in words)}
    for label, fields in rows.items():
        weights, summary, seconds = compressed_weights(smol_dir, AutoModelForCausalLM, SQLoRAConfig(**fields))
        install(fp, weights, originals)
        p = perplexity(fp, ids, 512, args.windows)
        tiers = {}
        for e in summary["layers"].values():
            tiers[e["tier"]] = tiers.get(e["tier"], 0) + 1
        ranks = sum(e["rank"] for e in summary["layers"].values())
        results["smollm2"][label] = {"ppl": p, "ratio": p / base, "bpw": summary["bits_per_weight"],
                                     "total_bytes": summary["total_bytes"], "seconds": seconds,
                                     "tiers": tiers, "total_rank": ranks, "config": fields}
        print(f"{label:44s} {summary['bits_per_weight']:6.3f} {p:8.3f} {p / base:6.3f} {seconds:7.1f}  "
              f"tiers={tiers} rank_sum={ranks}", flush=True)
        del weights
    install(fp, {}, originals)
    del fp

    mdir = minilm_path()
    if mdir is not None:
        mtok = AutoTokenizer.from_pretrained(mdir)
        texts = sentences(args.sentences)
        mini = AutoModel.from_pretrained(mdir, dtype=torch.float32)
        m_orig = {n: m.weight.detach().clone() for n, m in mini.named_modules() if isinstance(m, torch.nn.Linear)}
        ref = embed(mini, mtok, texts)
        print(f"\nall-MiniLM-L6-v2, {len(texts)} sentences: mean cosine to the fp32 embeddings", flush=True)
        calibration = dict(calibration=calibration_texts(), calibration_samples=128, calibration_seq_len=128)
        minilm_rows = {label: all_rows[label] for label in MINILM_ROWS}
        minilm_rows.update({label: {**fields, **calibration} for label, fields in MINILM_CALIBRATED_ROWS.items()})
        minilm_rows.update(MINILM_SELF_ROWS)
        for label, fields in minilm_rows.items():
            weights, summary, seconds = compressed_weights(mdir, AutoModel, SQLoRAConfig(**fields))
            install(mini, weights, m_orig)
            cos = float((embed(mini, mtok, texts) * ref).sum(-1).mean())
            results["minilm"][label] = {"cosine": cos, "bpw": summary["bits_per_weight"], "seconds": seconds}
            print(f"{label:44s} {summary['bits_per_weight']:6.3f} cos={cos:.4f} {seconds:7.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
