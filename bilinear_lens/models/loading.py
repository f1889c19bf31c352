"""Model directories in every format, as data: detect the format, read config + state dict +
tokenizer in our names, check what the files record; write ours or the HF Llama layout.

Three formats load (:data:`MODEL_FORMATS`), told apart by ``config.json``:

    bilinear-lens   {"format": "bilinear-lens", ...}          :mod:`bilinear_lens.models.checkpoint`
    hf-llama        {"model_type": "llama", ...}, no "format"  :mod:`bilinear_lens.models.hf_llama`
    paper           their Config fields (n_layer, n_head, d_hidden), no model_type, no format
                                                               :mod:`bilinear_lens.models.paper_checkpoints`

Reading returns data (:class:`ModelFiles`); this module never builds a model.
:func:`bilinear_lens.models.model.load_model` builds it once, from whichever format, then
calls :meth:`ModelFiles.check_records` (the checks that must come after the shape check).
Safetensors and JSON only: loading never unpickles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from torch import Tensor, nn

from bilinear_lens.data.tokenizer import load_model_tokenizer
from bilinear_lens.files.atomic import atomic_directory
from bilinear_lens.files.names import CONFIG_FILE, MODEL_DIR_FILES, WEIGHTS_FILE
from bilinear_lens.files.serialized import CheckpointError, read_json, read_tensor_metadata, read_tensors
from bilinear_lens.models.checkpoint import FORMAT_NAME, check_saved_config, read_model_config, write_model_dir
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.hf_llama import check_llama_expressible, from_llama_state_dict, model_config_from_llama, write_llama_files
from bilinear_lens.models.hub import resolve_model_dir
from bilinear_lens.models.paper_checkpoints import is_paper_config, read_paper_checkpoint
from bilinear_lens.output_locks import claim_export_dir

HF_LLAMA_FORMAT = "hf-llama"
PAPER_FORMAT = "paper"
MODEL_FORMATS = (FORMAT_NAME, HF_LLAMA_FORMAT, PAPER_FORMAT)
SAVE_FORMATS = (FORMAT_NAME, "hf")


def load_config(path: Union[str, Path]) -> ModelConfig:
    """Read and validate ``config.json`` of a model directory."""
    return ModelConfig.from_dict(read_model_config(path), where=str(Path(path) / CONFIG_FILE))


def detect_model_format(config: Any, config_path: Union[str, Path]) -> str:
    """Which of :data:`MODEL_FORMATS` the parsed ``config.json`` at ``config_path`` is.

    A JSON object with neither ``format`` nor ``model_type`` (and not the paper's fields)
    is a one-line :class:`CheckpointError`; anything else without ``model_type`` counts as
    ours, whose reader names what is wrong with it (not an object, another ``format``)."""
    if is_paper_config(config):
        return PAPER_FORMAT
    if isinstance(config, dict) and "format" not in config:
        if "model_type" in config:
            return HF_LLAMA_FORMAT
        raise CheckpointError(f"{config_path} has neither 'format' (bilinear-lens) nor 'model_type' (Hugging Face); cannot tell its format")
    return FORMAT_NAME


@dataclass(frozen=True)
class ModelFiles:
    """What a model directory holds, in our terms (every format).

    ``state``: our state dict (names and shapes of :class:`BilinearTransformer`);
    ``as_read``: the tensors as the file holds them (what its checksum covers; ``None`` for
    the paper's files, which record neither checksum nor config)."""

    format: str
    path: Path
    cfg: ModelConfig
    state: dict[str, Tensor]
    tokenizer: Any
    as_read: Optional[dict[str, Tensor]]

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    def check_records(self) -> None:
        """Refuse a ``config.json`` that differs from the config the weights were saved with
        (recorded in the safetensors metadata), then weights whose bytes do not match their
        recorded checksum. Called after the state dict's shape check, so shape-changing
        edits get that check's more specific message; the checksum last, after the checks
        that name what is wrong (garbled but finite bytes)."""
        if self.as_read is None:
            return
        metadata = read_tensor_metadata(self.weights_path)
        check_saved_config(self.cfg.to_dict(), metadata, where=str(self.path / CONFIG_FILE))
        from bilinear_lens.tensor_checksum import verify_tensors_checksum

        verify_tensors_checksum(self.as_read, metadata, where=str(self.weights_path))


def read_model_files(source: Union[str, Path]) -> ModelFiles:
    """The config, state dict and tokenizer of a model directory or hub id, in any of
    :data:`MODEL_FORMATS` (the paper's converted, with their tokenizer: see
    :func:`~bilinear_lens.models.paper_checkpoints.read_paper_checkpoint`). Every error is
    one line naming the file."""
    path = resolve_model_dir(source)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    raw = read_json(config_path, what="model config")
    fmt = detect_model_format(raw, config_path)
    if fmt == PAPER_FORMAT:
        cfg, state, tokenizer = read_paper_checkpoint(path)
        return ModelFiles(fmt, path, cfg, state, tokenizer, as_read=None)
    if fmt == HF_LLAMA_FORMAT:
        cfg = model_config_from_llama(raw, where=str(config_path))
        weights = read_tensors(weights_path, device="cpu", what="model weights")
        state = from_llama_state_dict(weights, cfg, where=str(weights_path))
    else:
        cfg = load_config(path)
        state = weights = read_tensors(weights_path, device="cpu", what="model weights")
    return ModelFiles(fmt, path, cfg, state, load_model_tokenizer(path), as_read=weights)


def save_model(model: nn.Module, path: Union[str, Path], format: str = FORMAT_NAME) -> Path:
    """Atomically write ``model`` (a :class:`BilinearTransformer`: its ``cfg``, state dict and
    ``tokenizer``) to directory ``path`` in ``format`` (see
    :meth:`BilinearTransformer.save_pretrained`)."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"format={format!r} is invalid: allowed {list(SAVE_FORMATS)}")
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    tokenizer = getattr(model, "tokenizer", None)
    if format == "hf":
        check_llama_expressible(cfg)  # before anything touches the disk
    # One writer per directory (a second is refused naming the holder); a replace a killed
    # writer left half done is finished first (bilinear_lens.output_locks).
    with claim_export_dir(path), atomic_directory(path, replaces=MODEL_DIR_FILES, what="a model directory") as tmp:
        if format == "hf":
            write_llama_files(tmp, cfg, model.state_dict(), tokenizer)
        else:
            write_model_dir(tmp, cfg.to_dict(), model.state_dict(), tokenizer)
    return Path(path)
