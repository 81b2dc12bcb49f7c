"""Pushing compressed models to a Hub (a real huggingface_hub client against tests/hub_server.py).

The load-back runs in a subprocess: huggingface_hub and transformers read HF_ENDPOINT when they are
imported, exactly as a user's fresh Python would, and this test process imported them long ago.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard, constants

import sqlora_hf
from sqlora_hf import SQLoRAConfig
from sqlora_hf.hub import (
    PLOT_FILE,
    CardInfo,
    HubPushError,
    InvalidRepoIdError,
    MissingTokenError,
    NotAnSQLoRACheckpointError,
    build_model_card,
    push_directory,
    push_to_hub,
)

from .conftest import auto_class
from .hub_server import TEST_TOKEN, hub_env  # noqa: F401  (fixture)

INPUT_IDS = torch.tensor([[1, 7, 42, 99, 3, 250, 17, 64, 128, 5, 200, 31]])


@pytest.fixture(scope="module")
def compressed(tiny_model_dirs, tmp_path_factory):
    """(model, logits on INPUT_IDS, saved directory) of a tiny untied Llama compressed with rank 4."""
    path, kind = tiny_model_dirs["llama_untied"]
    model = auto_class(kind).from_pretrained(path, quantization_config=SQLoRAConfig(bits=4, rank=4))
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    saved = tmp_path_factory.mktemp("compressed") / "tiny-sqlora"
    model.save_pretrained(saved)
    return model, logits, str(saved)


def _readme(hub, repo_id: str) -> str:
    return hub.repo(repo_id).head.files["README.md"].decode()


def _python_block(markdown: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", markdown, flags=re.S)
    assert blocks, "the card has no python usage snippet"
    return blocks[0]


@pytest.mark.slow
def test_push_then_load_by_repo_id_gives_identical_logits(hub_env, compressed, tmp_path):
    model, logits, _ = compressed
    url = sqlora_hf.push_to_hub(model, "tester/tiny-sqlora", quality={"perplexity": 12.5})

    repo = hub_env.repo("tester/tiny-sqlora")
    assert url == f"{hub_env.url}/tester/tiny-sqlora/commit/{repo.head.sha}"
    assert len(repo.commits) == 2, "expected the initial commit plus exactly one push commit"
    assert {"config.json", "model.safetensors", "README.md", PLOT_FILE} <= set(repo.head.files)
    assert repo.head.files[PLOT_FILE].startswith(b"\x89PNG\r\n\x1a\n")

    # The card's own usage snippet, run by a fresh interpreter that only knows HF_ENDPOINT, followed by
    # the checks that need the loaded model, snapshot_download and model_info.
    snippet = _python_block(_readme(hub_env, "tester/tiny-sqlora"))
    assert "import sqlora_hf" in snippet
    out = tmp_path / "loaded.pt"
    script = snippet + textwrap.dedent(f"""
        import json, os, torch
        from huggingface_hub import model_info, snapshot_download
        with torch.no_grad():
            torch.save(model({INPUT_IDS.tolist()!r} and torch.tensor({INPUT_IDS.tolist()!r})).logits, {str(out)!r})
        folder = snapshot_download("tester/tiny-sqlora")
        print(json.dumps({{"sha": model_info("tester/tiny-sqlora").sha, "files": sorted(os.listdir(folder))}}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT=hub_env.url)
    env.pop("HF_TOKEN")  # the repo is public: loading must not need the token
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(out)
    assert torch.equal(loaded, logits), f"max abs diff {(loaded - logits).abs().max()}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sha"] == repo.head.sha
    assert summary["files"] == sorted(repo.head.files)


def test_card_metadata_parses_and_describes_the_compression(hub_env, compressed):
    model, _, _ = compressed
    sqlora_hf.push_to_hub(model, "tester/card", base_model="HuggingFaceTB/SmolLM2-135M", license="apache-2.0",
                          quality={"perplexity (ctx 512)": 12.3456, "perplexity of the base model": 11.9},
                          quality_note="Python docs text, 16 windows.")
    text = _readme(hub_env, "tester/card")
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert "sqlora" in data["tags"]
    rep = sqlora_hf.report(model)
    assert f"{rep['bits_per_weight']:.3f}" in text
    assert sqlora_hf.__version__ in text
    assert "| perplexity (ctx 512) | 12.35 |" in text and "Python docs text, 16 windows." in text
    rows = [line for line in text.splitlines() if line.startswith("| `model.layers.")]
    assert len(rows) == rep["compressed_layers"] == 14
    first = next(iter(rep["layers"].values()))
    assert f"| {first['bits']} | {first['group_size']} | dense | {first['rank']} |" in rows[0]
    assert "calibration | none (data-free" in text


def test_card_shows_tier_and_relative_error_when_the_report_has_them(compressed):
    model, _, _ = compressed
    rep = sqlora_hf.report(model)
    first = next(iter(rep["layers"]))
    rep["layers"] = {n: {k: v for k, v in e.items() if k not in ("tier", "relative_error")}
                     for n, e in rep["layers"].items()}
    plain_report = {**rep, "layers": dict(rep["layers"])}
    rep["layers"][first] = {**rep["layers"][first], "tier": "nf3", "relative_error": 0.0123}
    qc = {**model.config.quantization_config.to_dict(), "memory_budget": "320MB"}
    text = str(build_model_card(rep, qc, model.config.to_dict(), CardInfo(repo_id="me/x"), "9.9"))
    assert "| tier | rel. error |" in text
    assert f"| `{first}` |" in text and "| nf3 | 0.0123 |" in text
    assert "| memory budget | 320MB |" in text
    # A report without those keys (or with them all unknown, as after a reload) shows no such column.
    plain = str(build_model_card(plain_report, model.config.quantization_config.to_dict(),
                                 model.config.to_dict(), CardInfo(repo_id="me/x", plot_file=None), "9.9"))
    assert "| tier |" not in plain and "rel. error" not in plain and PLOT_FILE not in plain


def test_repush_of_unchanged_model_makes_no_commit(hub_env, compressed):
    model, _, _ = compressed
    first = sqlora_hf.push_to_hub(model, "tester/again")
    second = sqlora_hf.push_to_hub(model, "tester/again")
    assert second == first
    assert len(hub_env.repo("tester/again").commits) == 2
    third = sqlora_hf.push_to_hub(model, "tester/again", quality={"perplexity": 10.0})  # the card changes
    assert third != first
    assert len(hub_env.repo("tester/again").commits) == 3


def test_token_never_in_card_commit_or_logs(hub_env, compressed, caplog, capfd):
    model, _, _ = compressed
    caplog.set_level(logging.DEBUG)
    sqlora_hf.push_to_hub(model, "tester/secret", commit_message="push tiny")
    auth = [r.headers.get("authorization", "") for r in hub_env.requests if r.method == "POST"]
    assert auth and all(TEST_TOKEN in a for a in auth), "the token was not used, so this test would prove nothing"
    for request in hub_env.requests:
        assert TEST_TOKEN not in request.path
        assert TEST_TOKEN.encode() not in request.body
    for path, content in hub_env.repo("tester/secret").head.files.items():
        assert TEST_TOKEN.encode() not in content, path
    captured = capfd.readouterr()
    assert TEST_TOKEN not in caplog.text + captured.out + captured.err


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_server_failure_mid_upload_is_a_clear_error_and_commits_nothing(hub_env, compressed, mode):
    model, _, _ = compressed
    sqlora_hf.push_to_hub(model, "tester/flaky")
    before = hub_env.repo("tester/flaky").head
    hub_env.fail_next("commit", mode)
    with pytest.raises(HubPushError, match="nothing was committed") as info:
        sqlora_hf.push_to_hub(model, "tester/flaky", quality={"perplexity": 1.5})
    assert "tester/flaky" in str(info.value) and TEST_TOKEN not in str(info.value)
    assert hub_env.repo("tester/flaky").head is before
    # A first push that fails leaves the new repo without any model file.
    hub_env.fail_next("commit", mode)
    with pytest.raises(HubPushError, match="nothing was committed"):
        sqlora_hf.push_to_hub(model, "tester/flaky-new")
    assert set(hub_env.repo("tester/flaky-new").head.files) == {".gitattributes"}


@pytest.mark.parametrize("repo_id", ["", "a b", "ns/name/extra", "-leading", "trailing.", "x" * 97, "ns//x"])
def test_invalid_repo_id_is_rejected_before_any_network_call(hub_env, compressed, repo_id):
    model, _, directory = compressed
    with pytest.raises(InvalidRepoIdError, match="repo"):
        sqlora_hf.push_to_hub(model, repo_id)
    with pytest.raises(InvalidRepoIdError, match="repo"):
        push_directory(directory, repo_id)
    assert hub_env.requests == []


def test_missing_token_is_a_clear_error(hub_env, compressed, monkeypatch, tmp_path):
    model, _, directory = compressed
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    with pytest.raises(MissingTokenError, match="HF_TOKEN"):
        sqlora_hf.push_to_hub(model, "tester/no-token")
    with pytest.raises(MissingTokenError, match="hf auth login"):
        push_directory(directory, "tester/no-token")
    assert hub_env.requests == []


def test_directory_that_is_not_an_sqlora_checkpoint_is_rejected(hub_env, tiny_model_dirs, compressed, tmp_path):
    fp_dir, kind = tiny_model_dirs["llama_untied"]
    with pytest.raises(NotAnSQLoRACheckpointError, match="no quantization_config"):
        push_directory(fp_dir, "tester/x")
    with pytest.raises(NotAnSQLoRACheckpointError, match="not a directory"):
        push_directory(str(tmp_path / "missing"), "tester/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAnSQLoRACheckpointError, match="no config.json"):
        push_directory(str(tmp_path / "empty"), "tester/x")
    # A config that claims sqlora over plain fp weights (a hand-edited or half-written save).
    fake = tmp_path / "fake"
    shutil.copytree(fp_dir, fake)
    config = json.loads((fake / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "sqlora"}
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotAnSQLoRACheckpointError, match="no packed layer"):
        push_directory(str(fake), "tester/x")
    fp_model = auto_class(kind).from_pretrained(fp_dir)
    with pytest.raises(NotAnSQLoRACheckpointError, match="not compressed by sqlora_hf"):
        sqlora_hf.push_to_hub(fp_model, "tester/x")
    assert hub_env.requests == []


def test_push_directory_uploads_the_saved_checkpoint(hub_env, compressed):
    _, _, directory = compressed
    url = push_directory(directory, "tester/from-dir", license="mit")
    repo = hub_env.repo("tester/from-dir")
    assert url.endswith(repo.head.sha)
    with open(os.path.join(directory, "model.safetensors"), "rb") as f:
        assert repo.head.files["model.safetensors"] == f.read()
    assert ModelCard(repo.head.files["README.md"].decode()).data.license == "mit"
    assert "README.md" not in os.listdir(directory), "pushing must not write into the user's directory"


def test_license_is_carried_from_the_local_source_model(hub_env, tiny_model_dirs, tmp_path):
    fp_dir, kind = tiny_model_dirs["llama_untied"]
    source = tmp_path / "source"
    shutil.copytree(fp_dir, source)
    (source / "README.md").write_text("---\nlicense: bsd-3-clause\n---\n# the base model\n")
    model = auto_class(kind).from_pretrained(source, quantization_config=SQLoRAConfig(rank=0))
    sqlora_hf.push_to_hub(model, "tester/licensed", include_plot=False)
    files = hub_env.repo("tester/licensed").head.files
    assert ModelCard(files["README.md"].decode()).data.license == "bsd-3-clause"
    assert PLOT_FILE not in files and PLOT_FILE not in files["README.md"].decode()


def test_missing_matplotlib_is_a_clear_error_before_any_upload(hub_env, compressed, monkeypatch):
    model, _, directory = compressed
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import` sees when the package is absent
    with pytest.raises(ImportError, match="pip install matplotlib"):
        sqlora_hf.push_to_hub(model, "tester/no-mpl")
    with pytest.raises(ImportError, match="--no-plot"):
        push_directory(directory, "tester/no-mpl")
    assert hub_env.requests == []


def test_card_rank_row_follows_the_layers_and_a_peft_model_is_refused(hub_env, compressed):
    """After a merge the layers hold another rank than the config says: the card shows what they hold. A
    PeftModel's save_pretrained writes an adapter only, which would be published as an unloadable repo."""
    from peft import get_peft_model

    model, _, _ = compressed
    rep = sqlora_hf.report(model)
    qc = model.config.quantization_config.to_dict()  # rank=4
    grown = {**rep, "layers": {n: {**e, "rank": 8} for n, e in rep["layers"].items()}}
    text = str(build_model_card(grown, qc, model.config.to_dict(), CardInfo(repo_id="me/x", plot_file=None), "9.9"))
    assert "rank 8 (config: rank=4)" in text
    text = str(build_model_card(rep, qc, model.config.to_dict(), CardInfo(repo_id="me/x", plot_file=None), "9.9"))
    assert "| rank 4 |" in text
    peft_model = get_peft_model(copy.deepcopy(model), sqlora_hf.lora_config(r=2, target_modules=["q_proj"]))
    with pytest.raises(NotAnSQLoRACheckpointError, match="is a PEFT model.*merge_and_unload"):
        push_to_hub(peft_model, "tester/peft", include_plot=False)


def test_private_push_creates_a_private_repo(hub_env, compressed):
    model, _, _ = compressed
    push_to_hub(model, "tester/private-model", private=True, include_plot=False)
    push_to_hub(model, "tester/public-model", include_plot=False)
    assert hub_env.repo("tester/private-model").private and not hub_env.repo("tester/public-model").private
