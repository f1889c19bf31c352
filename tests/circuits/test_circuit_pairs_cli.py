"""`bilinear-lens circuit pairs`: the pair decomposition from the command line."""

import json

import pytest
import torch

from bilinear_lens.circuits.pairs import mlp_pair_decomposition
from bilinear_lens.cli import main
from bilinear_lens.models.model import BilinearTransformer, build_model
from bilinear_lens.sae.config import SAEConfig
from bilinear_lens.sae.model import SAE, save_sae
from conftest import tiny_config

IDS = ["3", "17", "42", "5", "88", "11", "60"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("pairs_cli")
    tok = small_tokenizer
    model = build_model(tiny_config(d_vocab=len(tok), n_ctx=32, normalization_type="LN", mlp_bias=True), tokenizer=tok)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(root / "m")
    build_model(tiny_config(d_vocab=len(tok), n_ctx=32, mlp_kind="swiglu"), tokenizer=tok).save_pretrained(root / "swiglu")
    for name, hook, d_in in (("in", "blocks.1.hook_resid_mid", 32), ("narrow", "blocks.1.hook_resid_mid", 16),
                             ("early", "blocks.0.hook_resid_mid", 32)):
        sae = SAE(SAEConfig(d_in=d_in, d_sae=24, hook_name=hook, k=4, architecture="topk"))
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        save_sae(sae, root / name)
    return root


def run(root, capsys, *args):
    rc = main(["circuit", "pairs", *[a.format(root=root) for a in args]])
    out, err = capsys.readouterr()
    return rc, out, err


def single_token(tok):
    """A word that is exactly one token (with its leading space)."""
    for t in range(len(tok)):
        text = tok.decode([t])
        if text.startswith(" ") and len(text) > 2 and tok.encode(text, add_special_tokens=False) == [t]:
            return text
    raise AssertionError("no single-token word")


def test_json_equals_the_library_and_sums_to_the_observed_output(root, capsys):
    rc, out, _ = run(root, capsys, "--checkpoint", "{root}/m", "--ids", *IDS, "--layer", "1", "--token-id", "9",
                     "--position", "4", "--json", "--dtype", "float64")
    assert rc == 0
    record = json.loads(out)
    model = BilinearTransformer.from_pretrained(root / "m").double()
    pairs = mlp_pair_decomposition(model, torch.tensor([[int(i) for i in IDS]]), 1, 9, position=4)
    assert record["labels"] == pairs.labels and record["position"] == 4
    torch.testing.assert_close(torch.tensor(record["matrix"], dtype=torch.float64), pairs.matrix, rtol=0, atol=1e-12)
    assert abs(record["total"] - record["observed"]) < 1e-10  # float64: rounding only
    assert record["scale"] == pairs.scale and record["tokens"] == [int(i) for i in IDS]


def test_text_prompt_html_and_json_files(root, capsys, tmp_path):
    tok = BilinearTransformer.from_pretrained(root / "m").tokenizer
    word = single_token(tok)
    rc, out, _ = run(root, capsys, "--checkpoint", "{root}/m", "--text", "Lily was happy.", "--layer", "1",
                     "--token", word, "--out", str(tmp_path / "pairs.html"))
    assert rc == 0 and "sum of pair terms" in out and "shares" in out
    html = (tmp_path / "pairs.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    assert "http://" not in html and "https://" not in html
    rc, out, _ = run(root, capsys, "--checkpoint", "{root}/m", "--ids", *IDS, "--layer", "0", "--logit-diff-id", "9", "10",
                     "--out", str(tmp_path / "sub" / "pairs.json"))
    assert rc == 0
    saved = json.loads((tmp_path / "sub" / "pairs.json").read_text())
    assert saved["layer"] == 0 and len(saved["matrix"]) == len(saved["labels"])


def test_sae_writers(root, capsys):
    rc, out, _ = run(root, capsys, "--checkpoint", "{root}/m", "--ids", *IDS, "--layer", "1", "--token-id", "9",
                     "--writers", "sae", "--writer-sae", "{root}/in", "--json", "--dtype", "float64")
    assert rc == 0
    record = json.loads(out)
    assert "sae error" in record["labels"] and "sae b_dec" in record["labels"]
    assert abs(record["total"] - record["observed"]) < 1e-10


@pytest.mark.parametrize("args, message", [
    (("--position", "7"), "--position=7 is out of range for a prompt of 7 tokens"),
    (("--layer", "2"), "--layer 2: layer 2 is out of range"),
    (("--writers", "sae", "--writer-sae", "{root}/narrow"), "--writer-sae {root}/narrow: "),
    (("--writers", "sae", "--writer-sae", "{root}/early"),
     "sae.cfg.hook_name='blocks.0.hook_resid_mid' is not layer 1's MLP input"),
    (("--writers", "sae"), "--writers sae needs --writer-sae DIR"),
    (("--out", "pairs.png"), "--out pairs.png: the file must end in .html or .json"),
])
def test_bad_inputs_are_one_line_errors(root, capsys, args, message):
    base = ["--checkpoint", "{root}/m", "--ids", *IDS, "--token-id", "9"]
    if "--layer" not in args:
        base += ["--layer", "1"]
    rc, _, err = run(root, capsys, *base, *args)
    assert rc == 2
    assert err.count("\n") == 1 and message.format(root=root) in err


def test_non_bilinear_layer_and_multi_token_target(root, capsys):
    rc, _, err = run(root, capsys, "--checkpoint", "{root}/swiglu", "--ids", *IDS, "--layer", "1", "--token-id", "9")
    assert rc == 2 and "--layer 1: layer 1 has a 'swiglu' MLP" in err
    rc, _, err = run(root, capsys, "--checkpoint", "{root}/m", "--ids", *IDS, "--layer", "1", "--token", " happily sad")
    assert rc == 2 and "--token ' happily sad': ' happily sad' is" in err and "not one" in err
