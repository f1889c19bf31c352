"""A checksum of a state dict, recorded in a weights file's safetensors metadata at save and
verified at load, so garbled but finite bytes (which load as plausible weights) are refused.

``sha256`` over the tensors in name order: each name, dtype, shape and raw bytes (CPU,
contiguous). Files written before the checksum existed (no key) load as before.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["CHECKSUM_KEY", "tensors_sha256", "checksum_metadata", "verify_tensors_checksum"]

CHECKSUM_KEY = "bilinear_lens_tensors_sha256"


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """sha256 hex digest of ``tensors`` (names, dtypes, shapes, bytes; in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def checksum_metadata(tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """``{CHECKSUM_KEY: tensors_sha256(tensors)}`` for a safetensors file's metadata."""
    return {CHECKSUM_KEY: tensors_sha256(tensors)}


def verify_tensors_checksum(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], where: str) -> None:
    """A one-line ``CheckpointError`` naming ``where`` if ``tensors`` (as read) do not match
    the checksum recorded in ``metadata``; no recorded checksum passes."""
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is None:
        return
    found = tensors_sha256(tensors)
    if found != recorded:
        from bilinear_lens.files.serialized import CheckpointError

        raise CheckpointError(f"{where}: the tensors do not match the checksum recorded when they were saved "
                              f"(sha256 {found[:12]} != {recorded[:12]}): the file was damaged or edited after saving")
