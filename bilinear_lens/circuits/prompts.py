"""Prompts to token ids: one prompt (``[1, pos]``) for the per-prompt decompositions, and
clean/corrupted batches for patching (token tensors of one length, no padding).

:func:`one_prompt_tokens` is the single-prompt form used by the writers, pair, QK-pair,
linearized-model and graph code. :func:`prompt_tokens` is the batch form: patching aligns activations position by position, so a clean and a corrupted prompt must
tokenize to the same number of tokens, and a batch of prompts must not need padding (a
pad position would be patched like a real token). Both are refused with one-line errors.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

Prompts = Union[str, Sequence[str], Tensor]
TokensLike = Union[str, Tensor, Sequence[int]]


def one_prompt_tokens(model: Any, tokens: TokensLike) -> Tensor:
    """One prompt as ``[1, pos]`` int64 ids on the model's device: text (tokenised as
    ``model.to_tokens`` does), a list (any iterable) of ids, or a ``[pos]`` or ``[1, pos]`` tensor. A
    batch of several prompts is refused (the decompositions are per prompt)."""
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens)
    elif not isinstance(tokens, Tensor) and isinstance(tokens, Iterable):  # a list, tuple, range or array of ids
        tokens = torch.tensor(list(tokens), dtype=torch.long)
    if not isinstance(tokens, Tensor):
        raise ValueError(f"tokens must be text, a list of ids or a [1, pos] tensor, got {type(tokens).__name__}")
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be one prompt ([pos] or [1, pos] ids, or text), got shape {tuple(tokens.shape)}")
    return tokens.to(device=model.W_E.device, dtype=torch.long)


def prompt_tokens(model: Any, prompts: Prompts, name: str = "prompts", prepend_bos: Optional[bool] = None) -> Tensor:
    """``[batch, pos]`` token ids of ``prompts`` (a text, a list of texts or a token tensor
    ``[pos]``/``[batch, pos]``). Texts are tokenized one by one with ``model.to_tokens``;
    texts of different token lengths are refused (they would need padding), naming
    ``name`` and the lengths."""
    if isinstance(prompts, Tensor):
        tokens = prompts[None] if prompts.dim() == 1 else prompts
        if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"{name} must be a [batch, pos] token tensor, got shape {tuple(prompts.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be integer token ids, got {tokens.dtype}")
        return tokens.long()
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a text, a non-empty list of texts or a token tensor, got {type(prompts).__name__}")
    rows = [model.to_tokens(t, prepend_bos=prepend_bos) for t in texts]
    lengths = [int(r.shape[-1]) for r in rows]
    if len(set(lengths)) > 1:
        raise ValueError(
            f"{name} tokenize to different lengths {lengths}: patching needs prompts of one length, without padding"
        )
    return torch.cat([r.reshape(1, -1) for r in rows])


def check_prompt_pair(clean: Tensor, corrupted: Tensor) -> None:
    """One-line ``ValueError`` unless ``clean`` and ``corrupted`` are ``[batch, pos]`` of one shape."""
    if clean.shape[1] != corrupted.shape[1]:
        raise ValueError(
            f"clean and corrupted prompts have different lengths ({clean.shape[1]} and {corrupted.shape[1]} tokens): "
            "patching aligns positions, so they must tokenize to the same length"
        )
    if clean.shape[0] != corrupted.shape[0]:
        raise ValueError(f"clean has {clean.shape[0]} prompts and corrupted {corrupted.shape[0]}: give them in pairs")


def prompt_pair_tokens(
    model: Any, clean: Prompts, corrupted: Prompts, names: tuple[str, str] = ("clean", "corrupted")
) -> tuple[Tensor, Tensor]:
    """``(clean, corrupted)`` as ``[batch, pos]`` ids of one shape: :func:`prompt_tokens` of
    each (errors naming ``names``), then :func:`check_prompt_pair`."""
    clean_tokens = prompt_tokens(model, clean, names[0])
    corrupted_tokens = prompt_tokens(model, corrupted, names[1])
    check_prompt_pair(clean_tokens, corrupted_tokens)
    return clean_tokens, corrupted_tokens


def check_no_padding(attention_mask: Optional[Tensor]) -> None:
    """Refuse an attention mask with any zero (a padded batch)."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("attention_mask has padding (zeros): patching needs prompts of one length, without padding")
