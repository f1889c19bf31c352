"""Image classifiers built from the toolkit's MLP kinds (Pearce et al. 2024, §3).

Architecture (the paper's MNIST model, code ``tdooms/bilinear-decomposition``
``image/model.py``, with our MLP layout)::

    x        [batch, d_input]        flattened pixels (``image_shape`` = (height, width))
    h_0      = x @ W_E               [batch, d_model]  (``d_embed = 0``: no embedding, h_0 = x)
    h_{l+1}  = mlp_l(h_l)  (+ h_l with ``residual``)   one or two MLPs of ``mlp_kind``
    logits   = h_L @ W_U             [batch, n_classes]

``W_E`` ``[d_input, d_model]`` and ``W_U`` ``[d_model, n_classes]`` are stored as bias-free
``nn.Linear`` (``embed``, ``unembed``) and exposed in TransformerLens orientation, as the
MLPs' ``W_in/W_gate/W_out`` are (:mod:`bilinear_lens.models.mlp`), so the weight readings of
:mod:`bilinear_lens.weights.tensor` / :mod:`bilinear_lens.weights.eigen` run unchanged on
``model.mlps[l]``. For a one-layer bilinear model without residual or biases every logit is
a quadratic form of the pixels: ``logit_c(x) = x^T W_E Q(W_U e_c) W_E^T x``
(:mod:`bilinear_lens.weights.image_eigen`).

Checkpoint directory (atomic, safetensors + JSON, no pickle)::

    config.json          ImageClassifierConfig fields + {"format": "bilinear-lens-image-classifier",
                         "format_version": 1}
    model.safetensors    the state dict; its metadata records the config it was saved with
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from bilinear_lens.files.atomic import atomic_directory
from bilinear_lens.files.names import CONFIG_FILE, WEIGHTS_FILE
from bilinear_lens.files.serialized import CheckpointError, read_tensor_metadata, read_tensors, write_json, write_tensors
from bilinear_lens.models.checkpoint import check_finite, check_saved_config, check_state_dict, read_format_config, saved_config_metadata
from bilinear_lens.models.config import config_error, is_int, is_number
from bilinear_lens.models.mlp import make_mlp
from bilinear_lens.models.mlp_kinds import MLP_KINDS

IMAGE_FORMAT_NAME = "bilinear-lens-image-classifier"
IMAGE_FORMAT_VERSION = 1
MAX_IMAGE_LAYERS = 2

PathLike = Union[str, Path]


@dataclass
class ImageClassifierConfig:
    """An image classifier: ``image_shape`` pixels -> optional ``d_embed`` embedding ->
    ``n_layers`` (1 or 2) MLPs of ``mlp_kind`` with hidden width ``d_mlp`` -> ``n_classes`` logits.

    ``d_embed = 0`` feeds the pixels to the first MLP directly (``d_model = d_input``).
    ``residual``: each MLP adds its input back (``h + mlp(h)``); the paper's one-layer MNIST
    model has none. ``bias``: biases in the MLPs (the embedding and unembedding never have
    one). ``init_range``: std of the normal init of every weight (0: PyTorch's default
    ``nn.Linear`` init); ``seed`` seeds it.
    """

    image_shape: tuple[int, int] = (8, 8)
    n_classes: int = 10
    d_embed: int = 0
    d_mlp: int = 64
    n_layers: int = 1
    mlp_kind: str = "bilinear"
    residual: bool = False
    bias: bool = False
    init_range: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        name = "ImageClassifierConfig"
        shape = self.image_shape
        if isinstance(shape, list):
            shape = self.image_shape = tuple(shape)
        if not (isinstance(shape, tuple) and len(shape) == 2 and all(is_int(s) and s > 0 for s in shape)):
            raise config_error(name, "image_shape", self.image_shape, "must be two positive integers [height, width]")
        for key in ("n_classes", "d_mlp"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise config_error(name, key, getattr(self, key), "must be a positive integer")
        if self.n_classes < 2:
            raise config_error(name, "n_classes", self.n_classes, "must be at least 2")
        if not is_int(self.d_embed) or self.d_embed < 0:
            raise config_error(name, "d_embed", self.d_embed, "must be a non-negative integer (0: no embedding)")
        if not is_int(self.n_layers) or not 1 <= self.n_layers <= MAX_IMAGE_LAYERS:
            raise config_error(name, "n_layers", self.n_layers, f"must be an integer in [1, {MAX_IMAGE_LAYERS}]")
        if self.mlp_kind not in MLP_KINDS:
            raise config_error(name, "mlp_kind", self.mlp_kind, f"allowed values are {sorted(MLP_KINDS)}")
        for key in ("residual", "bias"):
            if not isinstance(getattr(self, key), bool):
                raise config_error(name, key, getattr(self, key), "must be true or false")
        if not is_number(self.init_range) or not 0 <= self.init_range < float("inf"):
            raise config_error(name, "init_range", self.init_range, "must be a finite number >= 0")
        if not is_int(self.seed) or self.seed < 0:
            raise config_error(name, "seed", self.seed, "must be a non-negative integer")

    @property
    def d_input(self) -> int:
        """Pixels per image, ``height * width``."""
        return self.image_shape[0] * self.image_shape[1]

    @property
    def d_model(self) -> int:
        """Width the MLPs read and write: ``d_embed``, or ``d_input`` without an embedding."""
        return self.d_embed or self.d_input

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_shape"] = list(self.image_shape)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "image classifier config") -> "ImageClassifierConfig":
        """Validate ``data``; unknown keys are refused naming them and ``where``."""
        allowed = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {where}; allowed keys: {allowed}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "ImageClassifierConfig":
        return dataclasses.replace(self, **changes)


class ImageClassifier(nn.Module):
    """See the module docstring. ``forward`` takes ``[batch, d_input]`` or
    ``[batch, height, width]`` pixels and returns ``[batch, n_classes]`` logits."""

    def __init__(self, cfg: ImageClassifierConfig):
        super().__init__()
        self.cfg = cfg
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)  # the init is a function of the config alone
        try:
            self.embed = nn.Linear(cfg.d_input, cfg.d_embed, bias=False) if cfg.d_embed else None
            self.mlps = nn.ModuleList(make_mlp(cfg.mlp_kind, cfg.d_model, cfg.d_mlp, bias=cfg.bias)
                                      for _ in range(cfg.n_layers))
            self.unembed = nn.Linear(cfg.d_model, cfg.n_classes, bias=False)
            if cfg.init_range > 0:
                for p in self.parameters():
                    if p.dim() >= 2:
                        nn.init.normal_(p, std=cfg.init_range)
                    else:
                        nn.init.zeros_(p)
        finally:
            torch.random.set_rng_state(gen_state)

    @property
    def W_E(self) -> Float[Tensor, "d_input d_model"]:
        """The embedding in TransformerLens orientation (the identity without one)."""
        if self.embed is None:
            return torch.eye(self.cfg.d_input, dtype=self.W_U.dtype, device=self.W_U.device)
        return self.embed.weight.T

    @property
    def W_U(self) -> Float[Tensor, "d_model n_classes"]:
        return self.unembed.weight.T

    def flatten(self, x: Tensor, name: str = "x") -> Float[Tensor, "batch d_input"]:
        """``x`` as ``[batch, d_input]``; a wrong image size is a one-line ``ValueError``."""
        d, (h, w) = self.cfg.d_input, self.cfg.image_shape
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 3 and tuple(x.shape[1:]) == (h, w):
            return x.reshape(x.shape[0], d)
        if x.ndim == 2 and x.shape[1] == d:
            return x
        raise ValueError(f"{name} has shape {tuple(x.shape)}: this model reads [batch, {d}] or [batch, {h}, {w}] "
                         f"images (image_shape={[h, w]})")

    def embed_input(self, x: Tensor) -> Float[Tensor, "batch d_model"]:
        x = self.flatten(x).to(self.W_U.dtype)
        return x if self.embed is None else self.embed(x)

    def layer_inputs(self, x: Tensor) -> list[Float[Tensor, "batch d_model"]]:
        """``[h_0, ..., h_L]``: each MLP's input and (last) the unembedding's input."""
        hs = [self.embed_input(x)]
        for mlp in self.mlps:
            h = hs[-1]
            hs.append(h + mlp(h) if self.cfg.residual else mlp(h))
        return hs

    def forward(self, x: Tensor) -> Float[Tensor, "batch n_classes"]:
        return self.unembed(self.layer_inputs(x)[-1])

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        """Predicted classes ``[batch]`` (eval mode; in batches of ``batch_size``)."""
        x = self.flatten(x)
        return torch.cat([self(chunk).argmax(-1) for chunk in x.split(batch_size)])

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Fraction of ``x`` classified as ``y``."""
        return float((self.predict(x).cpu() == y.cpu()).float().mean())


def write_image_classifier_files(directory: Path, model: ImageClassifier) -> None:
    """``config.json`` and ``model.safetensors`` of ``model`` into an existing ``directory``."""
    config = model.cfg.to_dict()
    write_json(directory / CONFIG_FILE, {**config, "format": IMAGE_FORMAT_NAME, "format_version": IMAGE_FORMAT_VERSION})
    write_tensors(directory / WEIGHTS_FILE, model.state_dict(),
                  metadata={"format": IMAGE_FORMAT_NAME, **saved_config_metadata(config)})


def save_image_classifier(model: ImageClassifier, path: PathLike) -> Path:
    """Write ``model`` to the directory ``path`` atomically (a crash leaves the old one)."""
    path = Path(path)
    with atomic_directory(path, what="an image classifier directory") as tmp:
        write_image_classifier_files(tmp, model)
    return path


def read_image_config(path: PathLike) -> ImageClassifierConfig:
    """The config of the image-classifier directory ``path`` (format checked)."""
    config_path = Path(path) / CONFIG_FILE
    data = read_format_config(path, IMAGE_FORMAT_NAME, IMAGE_FORMAT_VERSION, what="image classifier config",
                              kind="an image classifier config")
    try:
        return ImageClassifierConfig.from_dict(data, where=str(config_path))
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None


def load_image_classifier(path: PathLike, device: Union[str, torch.device] = "cpu") -> ImageClassifier:
    """Load a directory written by :func:`save_image_classifier` (or a training checkpoint /
    run's ``final``); never unpickles. Mismatched tensors, non-finite weights and a config
    edited after saving are :class:`CheckpointError` naming the file."""
    path = Path(path)
    if (path / "final" / CONFIG_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        path = path / "final"  # a run directory
    cfg = read_image_config(path)
    weights = path / WEIGHTS_FILE
    state = read_tensors(weights, what="image classifier weights")
    check_saved_config(cfg.to_dict(), read_tensor_metadata(weights), str(weights))
    model = ImageClassifier(cfg)
    check_state_dict(model.state_dict(), state, str(weights))
    check_finite(state, str(weights))
    model.load_state_dict(state)
    return model.to(device)


__all__ = [
    "IMAGE_FORMAT_NAME",
    "ImageClassifier",
    "ImageClassifierConfig",
    "load_image_classifier",
    "read_image_config",
    "save_image_classifier",
    "write_image_classifier_files",
]
