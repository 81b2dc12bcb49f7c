"""Sharing compressed models on the Hugging Face Hub: push, model cards, allocation pictures.

See docs/hub_and_cli.md. `import sqlora_hf` imports this package for `sqlora_hf.push_to_hub`;
matplotlib is imported only when a picture is drawn.
"""
from .card import PLOT_FILE, CardInfo, build_model_card, template_path
from .checkpoint import NotAnSQLoRACheckpointError, files_to_upload, load_checkpoint, read_sqlora_config
from .plot import plot_allocation
from .push import (
    HubPushError,
    InvalidRepoIdError,
    MissingTokenError,
    push_directory,
    push_to_hub,
    write_card_files,
)

__all__ = [
    "PLOT_FILE", "CardInfo", "HubPushError", "InvalidRepoIdError", "MissingTokenError", "NotAnSQLoRACheckpointError",
    "build_model_card", "files_to_upload", "load_checkpoint", "plot_allocation", "push_directory", "push_to_hub",
    "read_sqlora_config", "template_path", "write_card_files",
]
