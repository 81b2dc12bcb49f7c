"""The `sqlora` command line: a compress → inspect → eval → push round trip on a tiny model, and one
clear line (never a traceback) with a non-zero exit for every kind of bad argument."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

import sqlora_hf
from sqlora_hf.cli import main
from sqlora_hf.evaluation import perplexity, reference_text
from sqlora_hf.hub import PLOT_FILE, load_checkpoint

from .hub_server import hub_env  # noqa: F401  (fixture)


def _byte_tokenizer():
    """A 256-token byte-level tokenizer, so the tiny models (vocab 256) can read real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def source_dir(tiny_model_dirs, tmp_path_factory):
    """A tiny fp Llama with a tokenizer and a README whose license the compressed card must carry."""
    path = tmp_path_factory.mktemp("cli") / "tiny-fp"
    shutil.copytree(tiny_model_dirs["llama_untied"][0], path)
    _byte_tokenizer().save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: mit\n---\n# tiny test model\n")
    return path


@pytest.fixture(scope="module")
def compressed_dir(source_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny-sqlora"
    assert main(["compress", str(source_dir), str(out), "--bits", "4", "--skip", "lm_head"]) == 0
    return out


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(reference_text()[:20_000], encoding="utf-8")
    return path


@pytest.mark.slow  # the module's compression runs in this test's setup
def test_compress_writes_a_loadable_checkpoint_with_card_and_picture(compressed_dir, capsys):
    names = {p.name for p in compressed_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", PLOT_FILE} <= names
    card = ModelCard.load(compressed_dir / "README.md")
    assert card.data.license == "mit"
    assert "sqlora" in card.data.tags
    model = load_checkpoint(str(compressed_dir))
    rep = sqlora_hf.report(model)
    assert rep["compressed_layers"] == 14
    assert "lm_head" not in rep["layers"]


def test_inspect_prints_every_layer_and_the_totals(compressed_dir, tmp_path, capsys):
    png = tmp_path / "alloc.png"
    assert main(["inspect", str(compressed_dir), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rep = sqlora_hf.report(load_checkpoint(str(compressed_dir)))
    for name in rep["layers"]:
        assert name in out
    assert f"bits per weight:     {rep['bits_per_weight']:.3f}" in out
    assert f"whole model bytes:   {rep['total_bytes']}" in out
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_eval_prints_the_same_perplexity_as_the_library(compressed_dir, text_file, capsys):
    assert main(["eval", str(compressed_dir), "--text", str(text_file), "--context", "64", "--max-windows", "4"]) == 0
    out = capsys.readouterr().out
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(compressed_dir)(text_file.read_text(), return_tensors="pt").input_ids[0]
    expected = perplexity(load_checkpoint(str(compressed_dir)), ids, context=64, max_windows=4)
    assert out.startswith(f"perplexity {expected:.4f} (4 windows of 64 tokens")
    assert 1.0 < expected < 1e6


def test_push_uploads_the_directory_with_its_card(hub_env, compressed_dir, capsys):
    assert main(["push", str(compressed_dir), "tester/cli-model", "--quality", "perplexity=123.4"]) == 0
    url = capsys.readouterr().out.strip()
    repo = hub_env.repo("tester/cli-model")
    assert url == f"{hub_env.url}/tester/cli-model/commit/{repo.head.sha}"
    assert {"model.safetensors", "tokenizer.json", "README.md", PLOT_FILE} <= set(repo.head.files)
    card = ModelCard(repo.head.files["README.md"].decode())
    assert card.data.license == "mit"  # carried from the source model through the compress card
    assert "| perplexity | 123.4 |" in card.text
    assert 'AutoTokenizer.from_pretrained("tester/cli-model")' in card.text


def _bad_invocations(source: str, compressed: str, text: str, missing: str) -> list[list[str]]:
    return [
        [],
        ["frobnicate"],
        ["compress"],
        ["compress", source, f"{missing}/out", "--bits", "5"],
        ["compress", source, f"{missing}/out", "--group-size", "48"],
        ["compress", source, f"{missing}/out", "--sparsity", "3:4"],
        ["compress", source, f"{missing}/out", "--rank", "many"],
        ["compress", source, f"{missing}/out", "--budget", "1"],
        ["compress", source, f"{missing}/out", "--head-bits", "4"],
        ["compress", source, f"{missing}/out", "--backend", "nonexistent"],
        ["compress", missing, f"{missing}/out"],
        ["compress", "--gguf", f"{missing}/model.gguf", f"{missing}/out"],
        ["compress", source, "--gguf", f"{missing}/model.gguf", f"{missing}/out"],
        ["compress", compressed, f"{missing}/out"],
        ["compress", source, compressed],
        ["inspect"],
        ["inspect", missing],
        ["inspect", source],
        ["inspect", compressed, "--plot"],
        ["eval", compressed],
        ["eval", compressed, "--text", missing],
        ["eval", compressed, "--text", text, "--context", "1"],
        ["eval", compressed, "--text", text, "--max-windows", "0"],
        ["eval", source, "--text", text],
        ["eval", compressed, "--text", text, "--context", "100000"],
        ["eval", compressed, "--text", text, "--context", "512"],  # more than the tiny model's 128 positions
        ["compress", source, text],  # OUT is an existing file
        ["push"],
        ["push", compressed],
        ["push", compressed, "not a repo id"],
        ["push", source, "tester/x"],
        ["push", compressed, "tester/x", "--quality", "no-equals-sign"],
    ]


def test_compress_with_head_bits_packs_the_tied_head(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "tied-head8"
    assert main(["compress", tiny_model_dirs["llama"][0], str(out), "--rank", "0", "--head-bits", "8"]) == 0
    model = load_checkpoint(str(out))
    assert model.lm_head.bits == 8 and type(model.model.embed_tokens).__name__ == "PackedEmbedding"
    assert main(["inspect", str(out)]) == 0
    assert "output head lm_head 256x128: int8 g64" in capsys.readouterr().out
    card = (out / "README.md").read_text()  # the card says what was packed, not "the head (always)" kept
    assert "`head_bits=8`" in card and "embeddings, output head and tied weights" not in card


def test_every_command_with_bad_arguments_exits_nonzero_with_one_line(source_dir, compressed_dir, text_file,
                                                                       tmp_path, capsys):
    cases = _bad_invocations(str(source_dir), str(compressed_dir), str(text_file), str(tmp_path / "missing"))
    for argv in cases:
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code not in (0, None), f"{argv} succeeded"
        assert lines and "Traceback" not in err, f"{argv}: {err!r}"
        assert lines[-1].startswith("sqlora") and "error: " in lines[-1], f"{argv}: {err!r}"
        reason = [line for line in lines if "error: " in line]
        assert len(reason) == 1, f"{argv} printed more than one error line: {err!r}"


def test_bad_option_values_exit_2_like_argparse_errors(source_dir, compressed_dir, text_file, tmp_path, capsys):
    """Exit status 2 means "bad arguments" whether argparse or SQLoRAConfig refused the value; 1 is for the
    rest (a missing model, an existing output directory, ...)."""
    missing = str(tmp_path / "missing")
    usage = [["compress", str(source_dir), f"{missing}/out", "--bits", "5"],
             ["compress", str(source_dir), f"{missing}/out", "--sparsity", "3:4"],
             ["compress", str(source_dir), f"{missing}/out", "--budget", "xyz"],
             ["compress", str(source_dir), f"{missing}/out", "--dtype", "int4"],
             ["eval", str(compressed_dir), "--text", str(text_file), "--context", "1"],
             ["push", str(compressed_dir), "tester/x", "--quality", "perplexity"]]
    for argv in usage:
        assert main(argv) == 2, argv
        assert "error: " in capsys.readouterr().err
    assert main(["compress", missing, f"{missing}/out"]) == 1
    assert main(["compress", str(source_dir), str(compressed_dir)]) == 1  # already holds a model
    capsys.readouterr()


def test_push_without_token_is_one_line(compressed_dir, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    assert main(["push", str(compressed_dir), "tester/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sqlora push: error: no Hugging Face token found") and "\n" not in err


@pytest.mark.slow  # two fresh interpreters importing transformers
def test_console_script_reports_bad_arguments_without_traceback(tmp_path):
    """The installed entry point (`python -m sqlora_hf.cli` when the script is not on PATH)."""
    exe = shutil.which("sqlora")
    cmd = [exe] if exe else [sys.executable, "-m", "sqlora_hf.cli"]
    result = subprocess.run(cmd + ["inspect", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"sqlora inspect: error: '{tmp_path / 'nothing'}' is not a directory"]
    help_text = subprocess.run(cmd + ["compress", "--help"], capture_output=True, text=True, timeout=120).stdout
    for option in ("--bits", "--group-size", "--sparsity", "--rank", "--budget", "--skip", "--backend", "--gguf"):
        assert option in help_text


def test_gguf_source_is_detected_by_suffix(tmp_path, capsys):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file")
    code = main(["compress", str(bogus), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and len([line for line in err.splitlines() if "error: " in line]) == 1
