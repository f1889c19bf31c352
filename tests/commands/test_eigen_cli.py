"""``bilinear-lens eigen`` output: ``--json`` names the direction as plain text with its ids in
separate fields, and the poles of each eigenvector do not depend on ``--method`` or ``--dtype``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bilinear_lens.cli import main
from bilinear_lens.models.model import build_model
from bilinear_lens.sae.config import SAEConfig
from bilinear_lens.sae.model import SAE, save_sae
from conftest import tiny_config


@pytest.fixture(scope="module")
def root(tmp_path_factory, story_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("eigen_cli")
    tok = story_tokenizer
    torch.manual_seed(0)
    build_model(tiny_config(d_vocab=len(tok), n_ctx=64, n_layers=1), tokenizer=tok).save_pretrained(root / "m")
    sae = SAE(SAEConfig(d_in=32, d_sae=40, hook_name="blocks.0.hook_resid_post", k=4))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    save_sae(sae, root / "sae")
    return root


def eigen_json(root: Path, capsys, *args: str) -> dict:
    assert main(["eigen", "--checkpoint", str(root / "m"), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_direction_is_plain_text_with_ids(root, capsys) -> None:
    from bilinear_lens.models.model import BilinearTransformer

    tok = BilinearTransformer.from_pretrained(root / "m").tokenizer
    (happy,), (sad,) = tok.encode(" happy", add_special_tokens=False), tok.encode(" sad", add_special_tokens=False)
    out = eigen_json(root, capsys, "--token", " happy", "--top", "2")
    assert (out["direction"], out["direction_kind"], out["token_id"], out["token"]) == (" happy", "token", happy, " happy")
    assert len(out["eigenvectors"]) == 2 and out["layer"] == 0
    by_id = eigen_json(root, capsys, "--token-id", str(happy), "--top", "2")
    assert by_id == out  # the same direction however it was named
    diff = eigen_json(root, capsys, "--logit-diff", " happy", " sad", "--top", "1")
    assert diff["direction_kind"] == "logit_diff" and diff["token_ids"] == [happy, sad] and diff["tokens"] == [" happy", " sad"]
    feature = eigen_json(root, capsys, "--sae", str(root / "sae"), "--feature", "7", "--top", "1")
    assert feature["direction"] == f"feature 7 of {root / 'sae'}"  # the label other tests and scripts read
    assert (feature["direction_kind"], feature["feature"], feature["sae"], feature["feature_read"]) == (
        "feature", 7, str(root / "sae"), "decoder")
    assert "token_id" not in feature


def test_poles_do_not_depend_on_method_or_dtype(root, capsys) -> None:
    """The audit's case: --method lanczos / block or --dtype float64 used to swap "+ pole" and
    "- pole" of some eigenvectors against the default (dense eigh, float32)."""
    args = ("--token", " happy", "--top", "4", "--n-tokens", "5")
    runs = {extra: eigen_json(root, capsys, *args, *extra) for extra in
            [(), ("--method", "lanczos"), ("--method", "block"), ("--dtype", "float64")]}
    base = runs.pop(())["eigenvectors"]
    for extra, out in runs.items():
        for got, ref in zip(out["eigenvectors"], base, strict=True):
            # Scores are v . e_t (|e_t| ~ 5.6 here, scores ~ +-2). A float32 solve puts v within
            # 10 tol max|lambda| / gap ~ 10 * 1e-5 / 0.04 (the top 5 relative gaps are >= 4%) of the
            # float64 vector: scores within ~1.3e-2 (measured: 4e-6). A flipped v would negate them,
            # a change of >= 3.8, so 0.05 separates "same sign" from "flipped" with room both ways.
            assert got["eigenvalue"] == pytest.approx(ref["eigenvalue"], rel=1e-4), extra
            assert got["positive_scores"] == pytest.approx(ref["positive_scores"], abs=0.05), extra
            assert got["negative_scores"] == pytest.approx(ref["negative_scores"], abs=0.05), extra
