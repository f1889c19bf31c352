"""``bilinear-lens circuit patch`` / ``circuit attribute``: the JSON equals the library's result,
``--out`` writes JSON or an offline HTML heatmap, exactness diagnostics, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from bilinear_lens.circuits.patching import patch_grid
from bilinear_lens.commands import circuit
from bilinear_lens.models.model import BilinearTransformer
from bilinear_lens.views.patching_view import PatchingHeatmap

CLEAN, CORRUPT = " Jane was very happy", " Jane was not happy"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, story_tokenizer):
    tok = story_tokenizer
    cfg = tiny_config(d_vocab=len(tok), n_layers=1, normalization_type=None, init_range=0.2)
    model = BilinearTransformer(cfg, tokenizer=tok).eval()
    assert model.to_tokens(CLEAN).shape == model.to_tokens(CORRUPT).shape
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(path)
    return str(path)


def _run(capsys, *argv):
    code = circuit.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_patch_json_equals_the_library_grid(checkpoint, capsys):
    code, out, err = _run(capsys, "patch", "--checkpoint", checkpoint, "--clean", CLEAN, "--corrupt", CORRUPT,
                          "--logit-diff", " happy", " sad", "--kind", "attn_head_out_by_pos", "--json", "--device", "cpu")
    assert code == 0, err
    payload = json.loads(out)
    model = BilinearTransformer.from_pretrained(checkpoint).eval()
    a, b = model.to_single_token(" happy"), model.to_single_token(" sad")
    grid = patch_grid(model, CLEAN, CORRUPT, lambda logits: logits[:, -1, a] - logits[:, -1, b],
                      "attn_head_out_by_pos", progress=False)
    assert payload["axis_names"] == ["layer", "pos", "head"] and payload["shape"] == list(grid.values.shape[:-1])
    torch.testing.assert_close(torch.tensor(payload["values"]), grid.values, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(payload["mean_effect"]), grid.effect().mean(-1), rtol=0, atol=0)
    assert abs(payload["top"][0]["value"]) == pytest.approx(float(grid.effect().abs().max()))


def test_patch_out_writes_json_and_an_offline_html_heatmap(checkpoint, capsys, tmp_path):
    common = ["patch", "--checkpoint", checkpoint, "--clean", CLEAN, "--corrupt", CORRUPT, "--token", " happy"]
    code, out, err = _run(capsys, *common, "--out", str(tmp_path / "g.json"), "--json")
    assert code == 0, err
    assert json.loads((tmp_path / "g.json").read_text()) == json.loads(out)
    code, out, err = _run(capsys, *common, "--kind", "mlp_in_eigen", "--layer", "0", "--k", "3",
                          "--out", str(tmp_path / "g.html"))
    assert code == 0, err
    page = (tmp_path / "g.html").read_text()
    n_pos = json.loads((tmp_path / "g.json").read_text())["shape"][1]
    assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page
    assert page.count("<td ") == 3 * n_pos  # 3 components x positions
    assert "mlp_in_eigen: mean effect" in out


def test_attribute_two_point_is_exact_at_the_mlp_input_and_atp_is_not(checkpoint, capsys):
    common = ["attribute", "--checkpoint", checkpoint, "--clean", CLEAN, "--corrupt", CORRUPT,
              "--logit-diff", " happy", " sad", "--kind", "mlp_in", "--check-exact", "--json", "--dtype", "float64"]
    code, out, err = _run(capsys, *common, "--method", "two_point")
    assert code == 0, err
    two = json.loads(out)
    assert two["max_abs_gap_to_exact"] <= 1e-9  # one bilinear MLP, no norm: quadratic
    code, out, err = _run(capsys, *common, "--method", "atp")
    atp = json.loads(out)
    assert atp["max_abs_gap_to_exact"] > 1e-5  # measured 9e-4: 5 orders above two-point's gap
    as64 = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731 (JSON floats are doubles)
    gap = as64(atp["exact_scores"]) - as64(atp["scores"])
    torch.testing.assert_close(gap, as64(atp["remainder"]), rtol=0, atol=1e-10)


def test_attribute_table_and_frozen_gauss_legendre(checkpoint, capsys):
    code, out, err = _run(capsys, "attribute", "--checkpoint", checkpoint, "--clean", CLEAN, "--corrupt", CORRUPT,
                          "--token", " happy", "--kind", "embed", "--method", "gauss_legendre:1", "--freeze-patterns",
                          "--check-exact", "--dtype", "float64")
    assert code == 0, err
    # One bilinear MLP, no norm, patterns frozen: degree 2, so the midpoint rule is exact.
    assert "embed: gauss_legendre:1 scores" in out
    gap = float(out.strip().splitlines()[-1].split("= ")[1])
    assert gap <= 1e-9


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--clean", CLEAN, "--corrupt", " Luke was sad"], "clean and corrupted prompts have different lengths"),
        (["--clean", CLEAN, "--corrupt", CORRUPT, "--kind", "mlp_in_eigen"], "--kind mlp_in_eigen needs --layer"),
        (["--clean", CLEAN, "--corrupt", CORRUPT, "--out", "x.png"], "--out x.png: the file must end in .json or .html"),
        (["--clean", CLEAN, "--corrupt", CORRUPT, "--position", "40"], "--position 40 is out of range for prompts of"),
        (["--clean", CLEAN], "give --corrupt (texts) or --corrupt-ids (token ids), exactly one of them"),
        (["--clean-ids", "1,2", "--corrupt-ids", "1,x"], "--corrupt-ids takes comma-separated integer token ids"),
        (["--clean", CLEAN, "--corrupt", CORRUPT, "--max-batch", "0"], "--max-batch must be >= 1, got 0"),
        (["--clean", CLEAN, "--corrupt", CORRUPT, "--token", " happy sad"], "--token ' happy sad'"),
    ],
)
def test_patch_refuses_bad_input_with_one_line_errors(checkpoint, capsys, extra, message):
    argv = ["patch", "--checkpoint", checkpoint, *extra]
    if "--token" not in extra:
        argv += ["--token", " happy"]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_attribute_refuses_a_bad_method(checkpoint, capsys):
    code, _, err = _run(capsys, "attribute", "--checkpoint", checkpoint, "--clean", CLEAN, "--corrupt", CORRUPT,
                        "--token", " happy", "--method", "eap")
    assert code == 2 and "--method 'eap': method='eap' is invalid" in err


def test_heatmap_view_layout_and_errors():
    view = PatchingHeatmap(torch.arange(24.0).reshape(2, 3, 4) - 10, ["layer", "pos", "head"], column_labels=["a", "b", "c"])
    labels, matrix = view.rows()
    assert labels[:2] == ["layer 0 head 0", "layer 0 head 1"] and matrix.shape == (8, 3)
    assert matrix[1, 2] == 2 * 4 + 1 - 10  # layer 0, pos 2, head 1
    html = view._repr_html_()
    assert "rgb(255," in html and "rgb(" in html and "<script" not in html
    with pytest.raises(ValueError, match="values has 2 axes but axis_names names 3"):
        PatchingHeatmap(torch.zeros(2, 3), ["layer", "pos", "head"])
    with pytest.raises(ValueError, match="column_labels has 2 labels for 3 columns"):
        PatchingHeatmap(torch.zeros(2, 3), ["layer", "pos"], column_labels=["a", "b"])
