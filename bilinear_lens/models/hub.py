"""Hugging Face hub ids: download a model snapshot (cache- and offline-aware), push an export.

``resolve_model_dir("owner/name")`` calls ``huggingface_hub.snapshot_download``, which reads
the local cache (``HF_HUB_CACHE`` / ``HF_HOME``) and, with ``HF_HUB_OFFLINE=1``, never
touches the network. Only safetensors, JSON and tokenizer files are fetched: loading never
unpickles, so ``pytorch_model.bin`` is not even downloaded.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

from bilinear_lens.files.serialized import CheckpointError

# What a model directory needs (weights, configs, tokenizer); never pickles.
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(name: str) -> bool:
    """``owner/name`` with hub-legal characters (a local path such as ``runs/tiny/final`` is not)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def resolve_model_dir(name_or_path: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local model directory for ``name_or_path``: the directory itself, or the snapshot of
    a hub id. A missing local path raises ``FileNotFoundError``; a hub id that cannot be
    fetched (offline and not cached, unknown repo) raises a one-line :class:`CheckpointError`
    saying how to work offline."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():  # a regular file is a local path, never a hub id
        raise FileNotFoundError(f"checkpoint {path} is a file, not a model directory")
    if isinstance(name_or_path, Path) or not is_hub_id(str(name_or_path)):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if path.parent.is_dir() and str(path.parent) not in ("", "."):  # owner/ exists here: a local path
        raise FileNotFoundError(f"checkpoint directory not found: {path} (no such directory in {path.parent}; "
                                "not looked up on the hub because that directory exists locally)")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as err:  # huggingface_hub raises many types (offline, 404, network)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(
            f"no such directory {str(name_or_path)!r} here; as a hub id, {name_or_path!r} is not a local directory "
            f"and the hub model cannot be fetched{offline}: "
            f"{type(err).__name__}: {reason}; to work offline pass a local directory or fill the "
            f"cache ({constants.HF_HUB_CACHE}) once online"
        ) from None


def push_model_dir(
    write: Callable[[Path], Any],
    repo_id: str,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload model (bilinear-lens, HF Llama format)",
) -> Any:
    """``write(directory)`` into a temporary directory, then create ``repo_id`` (if needed)
    and upload the directory with ``huggingface_hub.HfApi``; returns the commit info."""
    from huggingface_hub import HfApi

    if not is_hub_id(repo_id):
        raise ValueError(f"repo_id={repo_id!r} is invalid: expected 'owner/name'")
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "export"
        write(export)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(folder_path=str(export), repo_id=repo_id, repo_type="model", commit_message=commit_message)
