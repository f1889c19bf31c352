"""A sparse autoencoder module, read and written in SAELens' format.

``SAE.encode(x)`` gives feature activations ``f [..., d_sae]``, ``SAE.decode(f)`` the
reconstruction ``x_hat = f W_dec + b_dec``, ``SAE.forward(x) = decode(encode(x))``. With
``n(.)`` the run-time normalisation (identity unless ``normalize_activations`` says so)::

    x'  = n(x) - b_dec * apply_b_dec_to_input
    pre = x' W_enc + b_enc                        (hook_sae_acts_pre)
    f   = relu(pre)        | topk_k(pre) then relu (hook_sae_acts_post)
    x_hat = n^-1(f W_dec + b_dec)                 (hook_sae_recons before n^-1)

With ``rescale_acts_by_decoder_norm`` (top-k only, SAELens' ``TopKSAE``) the top-k acts on
``pre * |W_dec[i]|`` and decoding uses ``f * (1 / |W_dec[i]|)``: the SAE behaves as if its decoder
rows had unit norm (SAELens' trainer writes unfolded weights with it set mid-run).

which is what SAELens computes for its ``standard`` and ``topk`` SAEs, so a directory
written by :func:`save_sae` loads in SAELens and vice versa (see
:mod:`bilinear_lens.sae.config` for the fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint

from bilinear_lens.files.atomic import atomic_directory
from bilinear_lens.files.names import SAE_CFG_FILE, SAE_WEIGHTS_FILE
from bilinear_lens.files.serialized import read_tensors, write_json, write_tensors
from bilinear_lens.models.checkpoint import check_finite, check_state_dict
from bilinear_lens.sae.config import SAEConfig, SAEConfigError, read_sae_config

PathLike = Union[str, Path]
_LN_EPS = 1e-5  # SAELens' layer_norm epsilon


def topk_relu(pre: Float[Tensor, "... d_sae"], k: int) -> Float[Tensor, "... d_sae"]:
    """Keep the ``k`` largest entries of each row (through a ReLU), zero the rest."""
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


class SAE(HookedRootModule):
    """Sparse autoencoder with SAELens' parameter names and hook points (module docstring)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_output = HookPoint()
        self.setup()

    def normalize_input(self, x: Tensor) -> tuple[Tensor, Any]:
        """``n(x)`` and what :meth:`_denormalize` needs to undo it."""
        kind = self.cfg.normalize_activations
        if kind == "constant_norm_rescale":
            coeff = self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, coeff
        if kind == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + _LN_EPS), (mu, std)
        return x, None

    def _denormalize(self, x: Tensor, state: Any) -> Tensor:
        kind = self.cfg.normalize_activations
        if kind != "none" and state is None:
            raise ValueError(f"decoding an SAE with normalize_activations={kind!r} needs the norm_state of its "
                             "input (use forward(x), or decode(f, norm_state))")
        if kind == "constant_norm_rescale":
            return x / state
        if kind == "layer_norm":
            mu, std = state
            return x * std + mu
        return x

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.cfg.d_in:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"SAE input must be [..., d_in={self.cfg.d_in}] (activations of {self.cfg.hook_name}), got {shape}")

    def encode_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Pre-activations ``x' W_enc + b_enc``."""
        self._check_input(x)
        x, _ = self.normalize_input(self.hook_sae_input(x.to(self.W_enc.dtype)))
        x = x - self.b_dec * self.cfg.apply_b_dec_to_input
        return self.hook_sae_acts_pre(x @ self.W_enc + self.b_enc)

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The SAE's nonlinearity: ReLU or top-k then ReLU."""
        return topk_relu(pre, self.cfg.k) if self.cfg.architecture == "topk" else pre.relu()

    def decoder_norms(self) -> Float[Tensor, "d_sae"]:
        """``|W_dec[i]|`` per feature."""
        return self.W_dec.norm(dim=-1)

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations ``f`` (sparse, >= 0)."""
        pre = self.encode_pre(x)
        if self.cfg.rescale_acts_by_decoder_norm:  # after hook_sae_acts_pre, as SAELens' TopKSAE.encode
            pre = pre * self.decoder_norms()
        return self.hook_sae_acts_post(self.activation(pre))

    def decode(self, feature_acts: Float[Tensor, "... d_sae"], norm_state: Any = None) -> Float[Tensor, "... d_in"]:
        """``f W_dec + b_dec``, un-normalised with ``norm_state`` (the second value of
        ``normalize_input(x)`` for the input ``x`` that gave ``f``; unused when
        ``normalize_activations="none"``)."""
        if self.cfg.rescale_acts_by_decoder_norm:  # SAELens' _act_times_W_dec: times the reciprocal, bit for bit
            feature_acts = feature_acts * (1 / self.decoder_norms())
        recons = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        return self._denormalize(recons, norm_state)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """Reconstruction ``decode(encode(x))`` (with the same normalisation undone)."""
        _, norm_state = self.normalize_input(x.to(self.W_enc.dtype)) if isinstance(x, Tensor) else (None, None)
        return self.hook_sae_output(self.decode(self.encode(x), norm_state))

    @torch.no_grad()
    def feature_acts(self, model: Any, tokens: Tensor) -> Float[Tensor, "batch pos d_sae"]:
        """Feature activations on ``tokens``, reading ``cfg.hook_name`` of ``model`` by hooks
        (no autograd: an analysis read-out)."""
        from bilinear_lens.models.hook_names import check_hook_names

        check_hook_names(model.hook_dict, [self.cfg.hook_name], where=type(model).__name__)
        _, cache = model.run_with_cache(tokens, names_filter=[self.cfg.hook_name])
        return self.encode(cache[self.cfg.hook_name])

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder row to unit norm (``W_dec[i] / |W_dec[i]|``)."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)


def write_sae_files(directory: Path, sae: SAE) -> None:
    """``cfg.json`` and ``sae_weights.safetensors`` into an existing ``directory`` (callers
    wrap it in :func:`~bilinear_lens.files.atomic.atomic_directory`)."""
    write_json(directory / SAE_CFG_FILE, sae.cfg.to_sae_lens_dict())
    write_tensors(directory / SAE_WEIGHTS_FILE, {k: v.detach().cpu() for k, v in sae.state_dict().items()})


def save_sae(sae: SAE, path: PathLike) -> Path:
    """Write ``sae`` to directory ``path`` in SAELens' format, atomically."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_sae_files(tmp, sae)
    return path


def load_sae(path: PathLike, model: Any = None) -> SAE:
    """Read an SAELens-format directory (never unpickles); a training run directory
    (:func:`~bilinear_lens.sae.train.train_sae`'s ``out``, no ``cfg.json`` of its own) means
    its ``final/`` SAE. With ``model``, also check that the SAE fits it
    (:func:`check_sae_fits_model`). Weights holding NaN or inf are refused, as a model's
    are (:class:`~bilinear_lens.files.serialized.CheckpointError` naming the file and tensor)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"SAE directory not found: {path}")
    if not (path / SAE_CFG_FILE).is_file() and (path / "final" / SAE_CFG_FILE).is_file():
        path = path / "final"  # an SAE training run directory (bilinear_lens.sae.train): its final SAE
    cfg = read_sae_config(path)
    sae = SAE(cfg)
    tensors = read_tensors(path / SAE_WEIGHTS_FILE, what="SAE weights")
    check_state_dict(sae.state_dict(), tensors, where=str(path / SAE_WEIGHTS_FILE))
    for key, tensor in tensors.items():  # a cast would silently change integer or garbled weights
        if not tensor.is_floating_point():
            from bilinear_lens.files.serialized import CheckpointError

            raise CheckpointError(f"{path / SAE_WEIGHTS_FILE}: {key} has dtype {tensor.dtype}; SAE weights must be floating point "
                                  f"(cfg.json dtype {cfg.torch_dtype})")
    tensors = {k: v.to(cfg.torch_dtype) for k, v in tensors.items()}
    check_finite(tensors, where=str(path / SAE_WEIGHTS_FILE))  # after the cast: an overflow to inf counts too
    sae.load_state_dict(tensors)
    if model is not None:
        sae.cfg = hf_hook_name_mapped(sae.cfg, model)
        check_sae_fits_model(sae, model, where=str(path / SAE_CFG_FILE))
    return sae.eval()


def hf_hook_name_mapped(cfg: SAEConfig, model: Any) -> SAEConfig:
    """``cfg`` with an HF module name (an SAE SAELens trained on our HF export through
    ``AutoModelForCausalLM``, e.g. ``model.layers.0.mlp``) replaced by ``model``'s exactly
    equal hook (``blocks.0.hook_mlp_out``; :func:`~bilinear_lens.models.hook_names.hf_hook_equivalent`),
    the original kept in ``metadata["hf_hook_name"]``. Other names are returned unchanged."""
    import dataclasses

    from bilinear_lens.models.hook_names import hf_hook_equivalent

    if cfg.hook_name in model.hook_dict:
        return cfg
    ours, _ = hf_hook_equivalent(cfg.hook_name, model)
    if ours is None:
        return cfg
    return dataclasses.replace(cfg, hook_name=ours, metadata={**dict(cfg.metadata), "hf_hook_name": cfg.hook_name})


def hook_width(model: Any, hook_name: str) -> int:
    """Last-dim size of activation ``hook_name`` (one-token forward through the hook)."""
    from bilinear_lens.models.hook_names import check_hook_names

    check_hook_names(model.hook_dict, [hook_name], where=type(model).__name__)
    device = next(model.parameters()).device
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.zeros(1, 1, dtype=torch.long, device=device), names_filter=[hook_name])
    return int(cache[hook_name].shape[-1])


def check_sae_fits_model(sae: SAE, model: Any, where: str = "SAE config") -> None:
    """Raise :class:`SAEConfigError` unless ``model`` has ``sae.cfg.hook_name`` and that
    activation is ``d_in`` wide."""
    from bilinear_lens.models.hook_names import UnknownHookError

    try:
        width = hook_width(model, sae.cfg.hook_name)
    except UnknownHookError as err:
        from bilinear_lens.models.hook_names import hf_hook_equivalent

        _, advice = hf_hook_equivalent(sae.cfg.hook_name, model)
        if advice is not None:  # an HF module name without an exact counterpart: say what is nearest
            raise SAEConfigError(f"{where}: field hook_name={sae.cfg.hook_name!r} is a Hugging Face Llama module name; "
                                 f"{advice}") from None
        raise SAEConfigError(f"{where}: field hook_name={sae.cfg.hook_name!r}: {err}") from None
    if width != sae.cfg.d_in:
        raise SAEConfigError(
            f"{where}: field d_in={sae.cfg.d_in} does not match the model: {sae.cfg.hook_name} is {width} wide "
            f"(d_model={model.cfg.d_model})"
        )
