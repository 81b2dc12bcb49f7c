"""Push a compressed model (in memory or saved on disk) to the Hugging Face Hub in one commit.

Order of work, chosen so mistakes cost nothing:
1. everything that can be checked offline is checked first (repo id, token, checkpoint, matplotlib);
2. the files are staged locally (weights, config, tokenizer, card, allocation PNG);
3. only then the network: create the repo if needed, then a single `create_commit` with every file.
   `create_commit` (not `upload_folder`) because `upload_folder` may split a large folder into
   several commits; one commit means a reader never sees weights without their card.
The Hub skips files whose content it already has, so pushing an unchanged model makes no commit.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Mapping, Optional, Union

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..config import QUANT_METHOD
from ..report import report as sqlora_report
from .card import PLOT_FILE, CardInfo, build_model_card, metadata_from_readme
from .checkpoint import NotAnSQLoRACheckpointError, files_to_upload, load_checkpoint, read_sqlora_config
from .plot import plot_allocation, require_matplotlib

logger = logging.getLogger("sqlora_hf")

DEFAULT_COMMIT_MESSAGE = "Upload model compressed with sqlora_hf"
Quality = Mapping[str, Union[float, int, str]]


class InvalidRepoIdError(ValueError):
    """The repo id cannot name a Hub repository."""


class MissingTokenError(ValueError):
    """No Hugging Face token was found anywhere the Hub client looks."""


class HubPushError(RuntimeError):
    """The Hub refused the push or the connection failed; the message says whether anything landed."""


def push_to_hub(
    model,
    repo_id: str,
    tokenizer=None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    quality: Optional[Quality] = None,
    quality_note: Optional[str] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,  # noqa: A002  (the Hub's metadata field is called license)
    include_plot: bool = True,
    endpoint: Optional[str] = None,
) -> CommitInfo:
    """Upload a model compressed by sqlora_hf, its tokenizer, a model card and an allocation PNG.

    Args:
        model: a transformers model loaded or compressed with `SQLoRAConfig`.
        repo_id: "namespace/name" (or "name" for your own namespace); created if missing.
        tokenizer: saved next to the model when given.
        private: visibility when the repo is created (None: the Hub's default).
        token: a Hugging Face token; default: `HF_TOKEN` or the token saved by `hf auth login`.
        quality: measured quality to show on the card, e.g. `{"perplexity": 12.3}`.
        quality_note: one sentence on how `quality` was measured.
        base_model / license: card metadata. By default the base model is the Hub id the model was
            compressed from (when it was compressed in this process from a Hub id) and the license
            is the base model's when its card is readable (on the Hub, or the README.md of the
            local directory the model was compressed from).
        include_plot: draw the allocation PNG (needs matplotlib).
        endpoint: the Hub URL; default `HF_ENDPOINT` (read now, not at import) or huggingface.co.

    Returns:
        The `CommitInfo` (a `str`: the commit URL). If nothing changed since the last push it is
        the URL of the existing head commit and no commit is made.
    """
    repo_id = check_repo_id(repo_id)
    token = resolve_token(token)
    quant_config = _quantization_config_dict(model)
    rep = sqlora_report(model)
    if rep["compressed_layers"] == 0:
        raise NotAnSQLoRACheckpointError(
            f"{type(model).__name__} has quant_method='{QUANT_METHOD}' but no compressed layer; nothing to push"
        )
    if include_plot:
        require_matplotlib()
    base_model = base_model or _compressed_from(model)
    endpoint = resolve_endpoint(endpoint)
    with tempfile.TemporaryDirectory(prefix="sqlora_push_") as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if license is None:
            license = _license_of(base_model, endpoint, token) if base_model else _source_license(model)
        info = CardInfo(repo_id=repo_id, base_model=base_model, license=license, quality=quality,
                        quality_note=quality_note, has_tokenizer=tokenizer is not None,
                        plot_file=PLOT_FILE if include_plot else None)
        write_card_files(staging, rep, quant_config, model.config.to_dict(), info)
        files = [(name, os.path.join(staging, name)) for name in files_to_upload(staging)]
        files += _card_files(staging, include_plot)
        return commit_files(files, repo_id, token=token, private=private, commit_message=commit_message,
                            endpoint=endpoint)


def push_directory(
    directory: str,
    repo_id: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    quality: Optional[Quality] = None,
    quality_note: Optional[str] = None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,  # noqa: A002
    include_plot: bool = True,
    endpoint: Optional[str] = None,
) -> CommitInfo:
    """Push a checkpoint saved by sqlora_hf (`save_pretrained` or `sqlora compress`) from disk.

    The directory is validated and loaded on CPU (for the per-layer report) before any network
    call. Base model and license default to those in the directory's README.md metadata (which
    `sqlora compress` writes). The directory itself is not modified.
    """
    repo_id = check_repo_id(repo_id)
    token = resolve_token(token)
    config = read_sqlora_config(directory)
    if include_plot:
        require_matplotlib()
    existing = metadata_from_readme(os.path.join(directory, "README.md"))
    base_model = base_model or existing.get("base_model")
    license = license or existing.get("license")  # noqa: A001
    model = load_checkpoint(directory)
    rep = sqlora_report(model)
    del model
    names = files_to_upload(directory)
    endpoint = resolve_endpoint(endpoint)
    with tempfile.TemporaryDirectory(prefix="sqlora_push_") as staging:
        info = CardInfo(repo_id=repo_id, base_model=base_model, license=license, quality=quality,
                        quality_note=quality_note,
                        has_tokenizer=any(n in names for n in ("tokenizer.json", "tokenizer_config.json")),
                        plot_file=PLOT_FILE if include_plot else None)
        write_card_files(staging, rep, config["quantization_config"], config, info)
        files = [(name, os.path.join(directory, name)) for name in names] + _card_files(staging, include_plot)
        return commit_files(files, repo_id, token=token, private=private, commit_message=commit_message,
                            endpoint=endpoint)


def write_card_files(directory: str, report: Mapping[str, Any], quant_config: Mapping[str, Any],
                     model_config: Mapping[str, Any], info: CardInfo) -> list[str]:
    """Write README.md (and the allocation PNG when `info.plot_file` is set) into `directory`."""
    from .. import __version__

    written = []
    if info.plot_file:
        written.append(plot_allocation(report, os.path.join(directory, info.plot_file),
                                       title=info.repo_id.split("/")[-1]))
    card = build_model_card(report, quant_config, model_config, info, __version__)
    readme = os.path.join(directory, "README.md")
    card.save(readme)
    written.append(readme)
    return written


def commit_files(files: list[tuple[str, str]], repo_id: str, *, token: str, private: Optional[bool],
                 commit_message: str, endpoint: str) -> CommitInfo:
    """Create the repo if needed and commit `files` ([(path in repo, local path)]) in one commit."""
    from .. import __version__

    if constants.is_offline_mode():
        raise HubPushError("HF_HUB_OFFLINE is set, so the Hub client refuses all network calls; unset it to push")
    api = HfApi(endpoint=endpoint, token=token, library_name="sqlora_hf", library_version=__version__)
    total = sum(os.path.getsize(p) for _, p in files)
    logger.info(f"sqlora: pushing {len(files)} files ({total / 1e6:.1f} MB) to {repo_id} on {endpoint}")
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    except Exception as err:
        raise HubPushError(
            f"could not create or open the repo {repo_id} on {endpoint}: {_reason(err, token)}; nothing was uploaded"
        ) from None
    head_before = _head(api, repo_id)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path in files]
    try:
        commit = api.create_commit(repo_id, operations, commit_message=commit_message)
    except Exception as err:
        head_after = _head(api, repo_id)
        if head_after is not None and head_after == head_before:
            state = "nothing was committed (the repo is unchanged)"
        elif head_after is None:
            state = "could not check whether anything was committed; look at the repo before retrying"
        else:
            state = f"the repo head is now {head_after[:10]}; check that commit before retrying"
        raise HubPushError(f"pushing to {repo_id} on {endpoint} failed: {_reason(err, token)}; {state}") from None
    if commit.oid == head_before:
        logger.info(f"sqlora: {repo_id} already holds these exact files; no new commit was made")
    else:
        logger.info(f"sqlora: committed {commit.commit_url}")
    return commit


# ---- checks that need no network ---------------------------------------------------------------
def check_repo_id(repo_id: Any) -> str:
    """`repo_id` if it can name a Hub model repo, else `InvalidRepoIdError` saying what is allowed."""
    allowed = ("'namespace/name' or 'name', each part letters, digits, '-', '_' or '.', "
               "not starting or ending with '-' or '.', at most 96 characters")
    if not isinstance(repo_id, str) or not repo_id:
        raise InvalidRepoIdError(f"repo_id must be a non-empty string ({allowed}); got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise InvalidRepoIdError(f"repo_id {repo_id!r} is not a valid Hub repo id; expected {allowed}") from None
    return repo_id


def resolve_token(token: Optional[str]) -> str:
    """The explicit token, else `HF_TOKEN` / the saved login; a clear error if there is none."""
    resolved = token if token else get_token()
    if not resolved:
        raise MissingTokenError(
            "no Hugging Face token found: pass token=..., set the HF_TOKEN environment variable, "
            "or run `hf auth login` (a token with write access is needed to push)"
        )
    return resolved


def resolve_endpoint(endpoint: Optional[str]) -> str:
    """`HF_ENDPOINT` read at call time (huggingface_hub reads it once, at import)."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# ---- helpers -----------------------------------------------------------------------------------
def _card_files(staging: str, include_plot: bool) -> list[tuple[str, str]]:
    out = [("README.md", os.path.join(staging, "README.md"))]
    if include_plot:
        out.append((PLOT_FILE, os.path.join(staging, PLOT_FILE)))
    return out


def _quantization_config_dict(model) -> dict[str, Any]:
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise NotAnSQLoRACheckpointError(
            f"{type(model).__name__} is a PEFT model: its save_pretrained writes the adapter only, which cannot be "
            "loaded as a model. Push sqlora_hf.merge_and_unload(model) for a merged checkpoint, or push the "
            "adapter with PEFT's own model.push_to_hub")
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        raise NotAnSQLoRACheckpointError(
            f"{type(model).__name__} was not compressed by sqlora_hf (its config has no quantization_config); "
            "load it with from_pretrained(..., quantization_config=SQLoRAConfig())"
        )
    as_dict = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    method = as_dict.get("quant_method")
    method = getattr(method, "value", method)
    if method != QUANT_METHOD:
        raise NotAnSQLoRACheckpointError(
            f"{type(model).__name__} is quantized with {method!r}, not '{QUANT_METHOD}'; sqlora_hf pushes only "
            "its own models"
        )
    return as_dict


def _compressed_from(model) -> Optional[str]:
    """The Hub id the model was compressed from in this process, if it was one (not a local path)."""
    quantizer = getattr(model, "hf_quantizer", None)
    source = getattr(model.config, "_name_or_path", "") or ""
    if quantizer is None or getattr(quantizer, "pre_quantized", True) or not source or os.path.exists(source):
        return None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def _source_license(model) -> Optional[str]:
    """The license in the README.md of the local directory the model was compressed from, if any."""
    quantizer = getattr(model, "hf_quantizer", None)
    source = getattr(model.config, "_name_or_path", "") or ""
    if quantizer is None or getattr(quantizer, "pre_quantized", True) or not os.path.isdir(source):
        return None
    license = metadata_from_readme(os.path.join(source, "README.md")).get("license")  # noqa: A001
    return license if isinstance(license, str) else None


def _license_of(base_model: str, endpoint: str, token: str) -> Optional[str]:
    """The base model's license from its Hub card, or None when it cannot be read (best effort)."""
    if os.path.isdir(base_model):
        return metadata_from_readme(os.path.join(base_model, "README.md")).get("license")
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(base_model, timeout=10)
    except Exception:
        return None
    data = getattr(info, "card_data", None)
    return getattr(data, "license", None) if data is not None else None


def _head(api: HfApi, repo_id: str) -> Optional[str]:
    try:
        return api.repo_info(repo_id).sha
    except Exception:
        return None


def _reason(err: BaseException, token: str) -> str:
    """One line saying why, with the token masked in case a server ever echoes it back."""
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > 300:
        text = text[:300] + "…"
    return f"{type(err).__name__}: {text}".replace(token, "***") if token else f"{type(err).__name__}: {text}"
