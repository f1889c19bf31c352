"""The paper's released checkpoints (tdooms/bilinear-decomposition, both layouts): state
dicts built in exactly their layout (random weights) convert to a model whose logits match
a reference forward written from their code's equations, and whose interaction matrices
equal their symmetrised tensor contraction."""

from __future__ import annotations

import math

import pytest
import torch

from bilinear_lens.cli import main as cli_main
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.model import BilinearTransformer
from bilinear_lens.models.model import load_paper_checkpoint
from bilinear_lens.weights.tensor import interaction_matrix
from fixtures.hub_cache import fill_cache
from fixtures.paper_checkpoints import D_HIDDEN, D_MODEL, N_CTX, N_HEAD, N_LAYER, N_VOCAB, paper_tokenizer, write_checkpoint


def oct2024_config(**changes) -> dict:
    """Their Oct-2024 ``Config`` as ``PretrainedConfig.save_pretrained`` writes it."""
    cfg = dict(n_head=N_HEAD, n_layer=N_LAYER, n_ctx=N_CTX, d_model=D_MODEL, d_hidden=D_HIDDEN, bilinear=True,
               gate=None, bias=False, normalization=True, tokenizer="ts-4096", repo=None,
               architectures=["Transformer"], torch_dtype="float32", transformers_version="4.44.0")
    cfg.update(changes)
    return cfg


def jun2024_config(**changes) -> dict:
    cfg = dict(n_vocab=N_VOCAB, n_head=N_HEAD, n_layer=N_LAYER, n_ctx=N_CTX, d_model=D_MODEL, d_hidden=D_HIDDEN,
               bilinear=True, gate=False, normalization=True, modifier="i5n", noise=None,
               architectures=["Transformer"], torch_dtype="float32")
    cfg.update(changes)
    return cfg


def paper_state(fmt: str, cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under exactly their parameter and buffer names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    # smaller weights without norms: the bilinear MLP squares the residual layer after layer,
    # and float32 logits of ~1e3 would carry rounding errors above the 1e-4 bound
    std = 0.3 if cfg.get("normalization") else 0.1
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * std  # noqa: E731
    d_head = D_MODEL // N_HEAD
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_head, 2).float() / d_head))
    state = {"transformer.wte.weight": rnd(N_VOCAB, D_MODEL), "lm_head.weight": rnd(N_VOCAB, D_MODEL)}
    out = "p" if fmt == "oct2024" else "o"
    for l in range(N_LAYER):
        h = f"transformer.h.{l}"
        state.update({f"{h}.attn.qkv.weight": rnd(3 * D_MODEL, D_MODEL), f"{h}.attn.o.weight": rnd(D_MODEL, D_MODEL),
                      f"{h}.attn.rotary.inv_freq": inv_freq.clone(), f"{h}.mlp.w.weight": rnd(2 * D_HIDDEN, D_MODEL),
                      f"{h}.mlp.{out}.weight": rnd(D_MODEL, D_HIDDEN)})
        if cfg.get("bias"):
            state.update({f"{h}.mlp.w.bias": rnd(2 * D_HIDDEN), f"{h}.mlp.{out}.bias": rnd(D_MODEL)})
    if fmt == "jun2024" and cfg.get("normalization"):
        for name in [f"transformer.h.{l}.{n}" for l in range(N_LAYER) for n in ("n1", "n2")] + ["transformer.n_f"]:
            state[f"{name}.norm.weight"] = 1 + rnd(D_MODEL)
            state[f"{name}.norm.bias"] = torch.zeros(D_MODEL)  # bias=False: a frozen zero parameter
    return state


def reference_forward(state: dict, cfg: dict, fmt: str, tokens: torch.Tensor) -> torch.Tensor:
    """Their forward, from src/language/transformer.py (Oct) / language/model.py (June) and
    shared/components.py, in float64: x + s * attn(n1(x)); x + p(gate(l) * r) with l, r the
    halves of w(n2(x)); logits = lm_head(n_f(x)); s = 1/sqrt(2 n_layer) (Oct) or 1 (June)."""
    st = {k: v.double() for k, v in state.items()}
    n_head, d_head, seq = cfg["n_head"], cfg["d_model"] // cfg["n_head"], tokens.shape[1]

    def norm(x, name):
        if not cfg.get("normalization"):
            return x
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)
        return y * st[f"{name}.norm.weight"] + st[f"{name}.norm.bias"] if fmt == "jun2024" else y

    def rotate(x):  # rotate_half + apply_rotary_pos_emb, base 10000
        freqs = torch.outer(torch.arange(seq, dtype=torch.float64), st["transformer.h.0.attn.rotary.inv_freq"])
        emb = torch.cat([freqs, freqs], -1)
        x1, x2 = x.chunk(2, -1)
        return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()

    gate = {None: lambda t: t, False: lambda t: t, "silu": torch.nn.functional.silu, "relu": torch.relu, True: torch.relu}[cfg.get("gate")]
    x = st["transformer.wte.weight"][tokens]
    out = "p" if fmt == "oct2024" else "o"
    scale = 1 / math.sqrt(2 * cfg["n_layer"]) if fmt == "oct2024" else 1.0
    for l in range(cfg["n_layer"]):
        h = f"transformer.h.{l}"
        qkv = norm(x, f"{h}.n1") @ st[f"{h}.attn.qkv.weight"].T  # [b, s, (n n_head d_head)]
        q, k, v = qkv.view(*qkv.shape[:2], 3, n_head, d_head).permute(2, 0, 3, 1, 4)
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(d_head)
        scores = scores.masked_fill(torch.ones(seq, seq).tril() == 0, -torch.inf)
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(*qkv.shape[:2], -1)
        x = x + scale * (z @ st[f"{h}.attn.o.weight"].T)
        pre = norm(x, f"{h}.n2") @ st[f"{h}.mlp.w.weight"].T + st.get(f"{h}.mlp.w.bias", 0)
        left, right = pre.chunk(2, -1)
        x = x + (gate(left) * right) @ st[f"{h}.mlp.{out}.weight"].T + st.get(f"{h}.mlp.{out}.bias", 0)
    return norm(x, "transformer.n_f") @ st["lm_head.weight"].T


CASES = [
    ("oct2024", oct2024_config()),
    ("oct2024", oct2024_config(normalization=False)),
    ("oct2024", oct2024_config(gate="silu", bias=True)),
    ("jun2024", jun2024_config()),
    ("jun2024", jun2024_config(normalization=None, bilinear=None, mlp="blp")),  # "no norm at all"
]


@pytest.mark.parametrize("fmt, cfg", CASES, ids=["oct", "oct-nonorm", "oct-swiglu-bias", "jun", "jun-nonorm-blp"])
def test_converted_logits_match_the_reference_forward(fmt, cfg, tmp_path):
    state = paper_state(fmt, cfg)
    model = load_paper_checkpoint(write_checkpoint(tmp_path / "ckpt", cfg, state))
    assert model.cfg.normalization_type == ({"oct2024": "RMSPre", "jun2024": "RMS"}[fmt] if cfg["normalization"] else None)
    tokens = torch.randint(0, N_VOCAB, (2, N_CTX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens).double() - reference_forward(state, cfg, fmt, tokens)).abs().max().item()
    assert diff <= 1e-4, diff  # the float32 bound; measured <= 5.6e-6 (logits up to ~6)


@pytest.mark.parametrize("fmt, cfg", [CASES[0], CASES[3]], ids=["oct", "jun"])
def test_interaction_matrix_equals_their_symmetrised_tensor(fmt, cfg, tmp_path):
    state = paper_state(fmt, cfg)
    model = load_paper_checkpoint(write_checkpoint(tmp_path / "ckpt", cfg, state))
    out = "p" if fmt == "oct2024" else "o"
    u = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(2))
    for l in range(N_LAYER):
        w_l, w_r = state[f"transformer.h.{l}.mlp.w.weight"].double().chunk(2, 0)
        w_p = state[f"transformer.h.{l}.mlp.{out}.weight"].double()
        b = torch.einsum("hi,hj,oh->oij", w_l, w_r, w_p)  # their `b` property, before symmetrising
        q_ref = torch.einsum("o,oij->ij", u.double(), 0.5 * (b + b.transpose(-1, -2)))
        torch.testing.assert_close(interaction_matrix(model.blocks[l].mlp, u).double(), q_ref, rtol=1e-5, atol=1e-5)


def test_no_bos_tokenizer_and_text_input(tmp_path):
    model = load_paper_checkpoint(write_checkpoint(tmp_path / "ckpt", oct2024_config(), paper_state("oct2024", oct2024_config())))
    assert not model.default_prepend_bos
    assert model.to_tokens("once upon a time").tolist() == [[1, 2, 3, 4]]
    assert model.to_tokens("once upon", prepend_bos=True).tolist() == [[0, 1, 2]]  # EOS stands in, as in TransformerLens
    assert model("lily was happy .").shape == (1, 4, N_VOCAB)


def test_hub_id_and_paper_tokenizer_from_the_offline_cache(offline_cache, tmp_path):
    cfg = oct2024_config()
    fill_cache(offline_cache, "tdooms/ts-medium", write_checkpoint(tmp_path / "ckpt", cfg, paper_state("oct2024", cfg), with_tokenizer=False))
    tok_dir = tmp_path / "tok"
    paper_tokenizer().save_pretrained(str(tok_dir))
    fill_cache(offline_cache, "tdooms/ts-tokenizer-4096", tok_dir)
    model = load_paper_checkpoint("tdooms/ts-medium")
    assert model.tokenizer.eos_token == model.tokenizer.pad_token == "[EOS]"


@pytest.mark.parametrize(
    "fmt, change, message",
    [
        ("oct2024", {"gate": "relu"}, r"config.json: bilinear=True with gate='relu' has no bilinear-lens MLP kind"),
        ("jun2024", {"gate": True}, r"config.json: bilinear=True with gate='relu' has no bilinear-lens MLP kind"),
        ("jun2024", {"mlp": "moe"}, r"config.json: mlp='moe' is not supported; allowed: 'blp'"),
        ("oct2024", {"n_head": None}, r"config.json: .*n_heads=None is invalid"),
        ("oct2024", {"d_hidden": 40}, r"model.safetensors does not match the model config: .*shape \(48, 32\) in file, model expects \(40, 32\)"),
    ],
)
def test_bad_paper_checkpoints_give_one_line_errors(fmt, change, message, tmp_path):
    cfg = (oct2024_config if fmt == "oct2024" else jun2024_config)()
    state = paper_state(fmt, cfg)
    cfg.update(change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_paper_checkpoint(write_checkpoint(tmp_path / "ckpt", cfg, state))
    assert "\n" not in str(info.value)


def test_missing_and_extra_tensors_and_nonzero_norm_bias(tmp_path):
    cfg = jun2024_config()
    state = paper_state("jun2024", cfg)
    bad = dict(state)
    del bad["transformer.h.1.mlp.o.weight"]
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor transformer.h.1.mlp.o.weight"):
        load_paper_checkpoint(write_checkpoint(tmp_path / "a", cfg, bad))
    extra = {**state, "transformer.h.0.attn.qkv.bias": torch.zeros(3 * D_MODEL)}
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['transformer.h.0.attn.qkv.bias'\]"):
        load_paper_checkpoint(write_checkpoint(tmp_path / "b", cfg, extra))
    biased = {**state, "transformer.n_f.norm.bias": torch.ones(D_MODEL)}
    with pytest.raises(CheckpointError, match=r"transformer.n_f.norm.bias is not zero"):
        load_paper_checkpoint(write_checkpoint(tmp_path / "c", cfg, biased))


def test_cli_convert_writes_ours_and_hf_and_refuses_cleanly(tmp_path, capsys):
    cfg = oct2024_config()
    state = paper_state("oct2024", cfg)
    src = write_checkpoint(tmp_path / "ckpt", cfg, state)
    assert cli_main(["convert", "--from", "tdooms", str(src), "--out", str(tmp_path / "ours")]) == 0
    assert "wrote" in capsys.readouterr().out
    ours = BilinearTransformer.from_pretrained(tmp_path / "ours")
    tokens = torch.randint(0, N_VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    # ours runs in float32, the reference in float64: float32 rounding through the tiny model
    # is ~1e-6 on these logits; 1e-4 would still catch a missing attention scale (O(1e-1))
    torch.testing.assert_close(ours(tokens).double(), reference_forward(state, cfg, "oct2024", tokens), rtol=0, atol=1e-4)
    assert cli_main(["convert", str(tmp_path / "ours"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = BilinearTransformer.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf(tokens), ours(tokens)) and not hf.default_prepend_bos
    cfg_bad = oct2024_config(gate="relu")
    bad = write_checkpoint(tmp_path / "bad", cfg_bad, paper_state("oct2024", cfg_bad))
    assert cli_main(["convert", "--from", "tdooms", str(bad), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bilinear-lens convert: error:") and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_from_pretrained_converts_their_checkpoints_on_the_fly(tmp_path):
    cfg = jun2024_config(model_type="")  # PretrainedConfig writes an empty model_type for custom configs
    state = paper_state("jun2024", cfg)
    path = write_checkpoint(tmp_path / "ckpt", cfg, state)
    model = BilinearTransformer.from_pretrained(path)
    tokens = torch.randint(0, N_VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(tokens), load_paper_checkpoint(path)(tokens))
