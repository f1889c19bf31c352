"""The paper converter's June-2024 variants (issue #21 item 5): the first June config
(``language/model.py`` of tdooms/bilinear-decomposition at 59bd794) says
``normalization: "rms" | "ln" | null``, ``norm_bias`` and ``mlp_bias``. ``"ln"`` is
``nn.LayerNorm(d_model, norm_bias)`` (second argument = eps) and ``mlp_bias`` biases ``mlp.w``
only. Checkpoints are built in exactly that layout and compared with a forward written from
that code's equations."""

from __future__ import annotations

import math

import pytest
import torch

from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.model import load_paper_checkpoint
from fixtures.paper_checkpoints import D_HIDDEN, D_MODEL, N_CTX, N_HEAD, N_LAYER, N_VOCAB, write_checkpoint

NORMS = [f"transformer.h.{l}.{n}" for l in range(N_LAYER) for n in ("n1", "n2")] + ["transformer.n_f"]


def first_june_config(**changes) -> dict:
    """Their first June-2024 ``Config`` (mlp / normalization strings, norm_bias, mlp_bias)."""
    cfg = dict(n_vocab=N_VOCAB, n_head=N_HEAD, n_layer=N_LAYER, n_ctx=N_CTX, d_model=D_MODEL, d_hidden=D_HIDDEN,
               mlp="blp", normalization="rms", norm_bias=False, mlp_bias=False, modifier=None, noise=None,
               architectures=["Transformer"], torch_dtype="float32")
    cfg.update(changes)
    return cfg


def first_june_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under that code's names: ``Norm.norm`` is ``RMSNorm`` (weight; bias only
    with norm_bias) or ``nn.LayerNorm`` (weight and bias always); ``BLP.w`` has a bias with
    mlp_bias, ``BLP.o`` never."""
    gen = torch.Generator().manual_seed(seed)
    # smaller without norms: the bilinear MLP squares the residual layer after layer (as there)
    std = 0.3 if cfg["normalization"] else 0.1
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * std  # noqa: E731
    d_head = D_MODEL // N_HEAD
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_head, 2).float() / d_head))
    state = {"transformer.wte.weight": rnd(N_VOCAB, D_MODEL), "lm_head.weight": rnd(N_VOCAB, D_MODEL)}
    for l in range(N_LAYER):
        h = f"transformer.h.{l}"
        state.update({f"{h}.attn.qkv.weight": rnd(3 * D_MODEL, D_MODEL), f"{h}.attn.o.weight": rnd(D_MODEL, D_MODEL),
                      f"{h}.attn.rotary.inv_freq": inv_freq.clone(), f"{h}.mlp.w.weight": rnd(2 * D_HIDDEN, D_MODEL),
                      f"{h}.mlp.o.weight": rnd(D_MODEL, D_HIDDEN)})
        if cfg["mlp_bias"]:
            state[f"{h}.mlp.w.bias"] = rnd(2 * D_HIDDEN)
    if cfg["normalization"]:
        for name in NORMS:
            state[f"{name}.norm.weight"] = 1 + rnd(D_MODEL)
            if cfg["normalization"] == "ln" or cfg["norm_bias"]:
                state[f"{name}.norm.bias"] = rnd(D_MODEL)
    return state


def first_june_forward(state: dict, cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Their forward in float64: ``Norm`` = ``x / sqrt(mean(x^2) + 1e-8) * w (+ b)`` or
    ``F.layer_norm(x, eps=float(norm_bias))``; ``x + o(attn(n1 x))``; ``x + o(l * r)`` with
    ``l, r = w(n2 x).chunk(2)``; ``lm_head(n_f x)``."""
    st = {k: v.double() for k, v in state.items()}
    n_head, d_head, seq = cfg["n_head"], cfg["d_model"] // cfg["n_head"], tokens.shape[1]

    def norm(x, name):
        if cfg["normalization"] == "ln":
            return torch.nn.functional.layer_norm(x, (x.shape[-1],), st[f"{name}.norm.weight"], st[f"{name}.norm.bias"],
                                                  eps=float(cfg["norm_bias"]))
        if cfg["normalization"] == "rms":
            y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8) * st[f"{name}.norm.weight"]
            return y + st.get(f"{name}.norm.bias", 0)
        return x

    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), st["transformer.h.0.attn.rotary.inv_freq"])
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    rotate = lambda t: t * cos + torch.cat([-t.chunk(2, -1)[1], t.chunk(2, -1)[0]], -1) * sin  # noqa: E731
    x = st["transformer.wte.weight"][tokens]
    for l in range(cfg["n_layer"]):
        h = f"transformer.h.{l}"
        qkv = norm(x, f"{h}.n1") @ st[f"{h}.attn.qkv.weight"].T
        q, k, v = qkv.view(*qkv.shape[:2], 3, n_head, d_head).permute(2, 0, 3, 1, 4)
        scores = (rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(d_head)).masked_fill(torch.ones(seq, seq).tril() == 0, -torch.inf)
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(*qkv.shape[:2], -1) @ st[f"{h}.attn.o.weight"].T
        left, right = (norm(x, f"{h}.n2") @ st[f"{h}.mlp.w.weight"].T + st.get(f"{h}.mlp.w.bias", 0)).chunk(2, -1)
        x = x + (left * right) @ st[f"{h}.mlp.o.weight"].T
    return norm(x, "transformer.n_f") @ st["lm_head.weight"].T


CASES = {
    "ln": first_june_config(normalization="ln"),
    "ln-normbias-eps1": first_june_config(normalization="ln", norm_bias=True),
    "rms-mlpbias": first_june_config(mlp_bias=True),
    "ln-mlpbias": first_june_config(normalization="ln", mlp_bias=True),
    "none-mlpbias": first_june_config(normalization=None, mlp_bias=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_first_june_variants_convert_to_their_forward(name, tmp_path):
    cfg = CASES[name]
    state = first_june_state(cfg)
    model = load_paper_checkpoint(write_checkpoint(tmp_path / "ckpt", cfg, state))
    assert model.cfg.normalization_type == {"ln": "LN", "rms": "RMS", None: None}[cfg["normalization"]]
    assert model.cfg.mlp_bias == cfg["mlp_bias"]
    tokens = torch.randint(0, N_VOCAB, (2, N_CTX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens).double() - first_june_forward(state, cfg, tokens)).abs().max().item()
    assert diff <= 1e-4, diff  # float32 vs float64 reference, the bound of test_hf_paper_checkpoints.py


def test_rms_with_a_trained_bias_is_refused_naming_norm_bias(tmp_path):
    cfg = first_june_config(norm_bias=True)
    with pytest.raises(CheckpointError, match=r"transformer.h.0.n1.norm.bias is not zero \(a trained RMSNorm bias: "
                                              r"config norm_bias=true\)") as info:
        load_paper_checkpoint(write_checkpoint(tmp_path / "ckpt", cfg, first_june_state(cfg)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["batchnorm", 1])
def test_unknown_normalization_is_refused_naming_the_field(tmp_path, value):
    cfg = first_june_config()
    state = first_june_state(cfg)
    with pytest.raises(CheckpointError, match=rf"config.json: normalization={value!r} is not supported"):
        load_paper_checkpoint(write_checkpoint(tmp_path / "ckpt", {**cfg, "normalization": value}, state))
