"""The shared output-direction arguments of eigen / ablate / report (tokens as text, ids via
--token-id, logit differences, SAE features) and one-line errors (exit 2) for bad counts."""

import json

import pytest
import torch

from bilinear_lens.weights.layer_eigen import layer_eigendecomposition
from bilinear_lens.cli import main
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.models.model import build_model
from bilinear_lens.sae.config import SAEConfig
from bilinear_lens.sae.features import eigenvector_input_features
from bilinear_lens.sae.model import SAE, load_sae, save_sae
from bilinear_lens.weights.directions import FeatureDirection
from conftest import tiny_config


@pytest.fixture(scope="module")
def root(tmp_path_factory, story_tokenizer):
    root = tmp_path_factory.mktemp("cli")
    tok = story_tokenizer
    torch.manual_seed(0)
    model = build_model(tiny_config(d_vocab=len(tok), n_ctx=64, n_layers=1), tokenizer=tok)
    model.save_pretrained(root / "m")
    for name, hook, d_in in (("out", "blocks.0.hook_resid_post", 32), ("in", "blocks.0.hook_resid_mid", 32),
                             ("narrow", "blocks.0.hook_resid_post", 16)):
        sae = SAE(SAEConfig(d_in=d_in, d_sae=40, hook_name=hook, k=4))
        gen = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        save_sae(sae, root / name)
    (root / "text.txt").write_text("\n\n".join(synthetic_stories(4, seed=1)))
    return root


def run(root, capsys, *args):
    rc = main([a.format(root=root) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_token_is_text_and_ids_are_explicit(root, capsys):
    """`--token 5` is the text "5" (before: the id 5); ids go through --token-id."""
    model = load_model(root)
    rc, out, _ = run(root, capsys, "eigen", "--checkpoint", "{root}/m", "--token-id", "5", "--top", "2", "--json")
    assert rc == 0
    assert json.loads(out)["eigenvectors"][0]["eigenvalue"] == pytest.approx(float(layer_eigendecomposition(model, 0, 5).eigenvalues[0]), rel=1e-5)
    ids = model.tokenizer.encode("5", add_special_tokens=False)
    rc, out, err = run(root, capsys, "eigen", "--checkpoint", "{root}/m", "--token", "5", "--top", "2", "--json")
    if len(ids) == 1:
        assert rc == 0 and ids != [5]
        expected = float(layer_eigendecomposition(model, 0, ids[0]).eigenvalues[0])
        assert json.loads(out)["eigenvectors"][0]["eigenvalue"] == pytest.approx(expected, rel=1e-5)
    else:
        assert rc == 2 and "--token '5': '5' is" in err


def load_model(root):
    from bilinear_lens.models.model import BilinearTransformer

    return BilinearTransformer.from_pretrained(root / "m")


@pytest.mark.parametrize("args, message", [
    (["eigen", "--logit-diff", " happy", " happy"], "the same token, a zero direction"),
    (["eigen", "--token", " happy", "--n-tokens", "-2"], "--n-tokens must be >= 1, got -2"),
    (["eigen", "--token", " happy", "--token-id", "3"], "give one output direction, got 2"),
    (["eigen"], "give an output direction: --token, --token-id"),
    (["eigen", "--token", " zzzqqq"], "--token ' zzzqqq': ' zzzqqq' is"),
    (["eigen", "--token-id", "9999"], "--token-id 9999: token id 9999 is out of range"),
    (["eigen", "--sae", "{root}/out"], "--sae and --feature go together"),
    (["eigen", "--sae", "{root}/out", "--feature", "40"], "feature index 40 out of range [0, 40)"),
    (["eigen", "--sae", "{root}/narrow", "--feature", "1"], "cfg.json: field d_in=16 does not match the model"),
    (["eigen", "--sae", "{root}/nope", "--feature", "1"], "--sae {root}/nope: SAE directory not found"),
    (["report", "--out", "{root}/r.html", "--token", " zzzqqq"], "--token ' zzzqqq': ' zzzqqq' is"),
    (["report", "--out", "{root}/r.html", "--input-token", " zzzqqq"], "--input-token ' zzzqqq': ' zzzqqq' is"),
    (["report", "--out", "{root}/r.html", "--n-eigenvectors", "0"], "--n-eigenvectors must be >= 1, got 0"),
    (["report", "--out", "{root}"], "is a directory; give the HTML file to write"),
    (["polytope", "--text-file", "{root}/text.txt", "--k", "0"], "--k must be >= 1, got 0"),
    (["polytope", "--text-file", "{root}/text.txt", "--purity-tokens", "0"], "--purity-tokens must be >= 1, got 0"),
    (["ablate", "--sae", "{root}/out", "--feature", "1", "--token", " happy"], "give one output direction, got 2"),
])
def test_bad_arguments_exit_2_with_one_line(root, capsys, args, message):
    rc, _, err = run(root, capsys, args[0], "--checkpoint", "{root}/m", *args[1:])
    assert rc == 2, err
    assert message.format(root=root) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eigen_with_output_feature_and_input_sae(root, capsys):
    rc, out, _ = run(root, capsys, "eigen", "--checkpoint", "{root}/m", "--sae", "{root}/out", "--feature", "7",
                     "--input-sae", "{root}/in", "--n-input-features", "3", "--top", "2", "--json")
    assert rc == 0
    result = json.loads(out)
    model = load_model(root)
    le = layer_eigendecomposition(model, 0, FeatureDirection(load_sae(root / "out"), 7))
    expected = eigenvector_input_features(model, le, load_sae(root / "in"), n_vectors=2, n_features=3)
    assert result["direction"] == f"feature 7 of {root}/out"
    for row, exp in zip(result["eigenvectors"], expected):
        assert row["eigenvalue"] == pytest.approx(exp.eigenvalue, rel=1e-6)
        assert row["positive_features"] == exp.positive_features and row["negative_features"] == exp.negative_features


def test_ablate_ranks_by_the_feature(root, capsys):
    from bilinear_lens.sae.ablation import feature_ablation_sweep

    rc, out, _ = run(root, capsys, "ablate", "--checkpoint", "{root}/m", "--sae", "{root}/out", "--feature", "2",
                     "--n-texts", "2", "--seq-len", "16", "--top", "3", "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["ranked_by"] == "|delta_feature|" and result["rank_column"] == "delta_feature"
    model = load_model(root)
    from bilinear_lens.training.measured_text import measured_rows

    measured = measured_rows(model, str(root / "m"), n_texts=2, seq_len=16)
    table = feature_ablation_sweep(model, measured.rows, 0, FeatureDirection(load_sae(root / "out"), 2),
                                   documents=measured.document_ids)
    expected = table.top(3, by="delta_feature").rows()
    assert [r["neuron"] for r in result["neurons"]] == [r["neuron"] for r in expected]
    # the feature's effects carry uncertainty too, clustered as the CLI's loss effects are
    assert result["se_column"] == "delta_feature_se" and result["q_column"] == "delta_feature_q"
    assert [r["delta_feature_q"] for r in result["neurons"]] == [r["delta_feature_q"] for r in expected]
    assert result["n_distinguishable"] == int((table["delta_feature_q"] < 0.05).sum())
    rc, out, _ = run(root, capsys, "ablate", "--checkpoint", "{root}/m", "--token", " happy", "--n-texts", "2",
                     "--seq-len", "16", "--top", "3", "--json")
    assert rc == 0 and json.loads(out)["ranked_by"] == "|delta_logit|"


def test_report_with_a_feature_section(root, capsys, tmp_path):
    rc, _, err = run(root, capsys, "report", "--checkpoint", "{root}/m", "--out", str(tmp_path / "r.html"),
                     "--sae", "{root}/out", "--feature", "3", "--token", " happy", "--n-texts", "2")
    assert rc == 0, err
    page = (tmp_path / "r.html").read_text()
    assert f"Output feature 3 of the SAE on blocks.0.hook_resid_post: eigendecomposition" in page
    assert "Output &#x27; happy&#x27;: eigendecomposition" in page


def test_report_python_api_refuses_named_tokens_that_are_not_one_token(root):
    """Before, build_report silently replaced them by the sample's most frequent tokens."""
    from bilinear_lens.views.report import build_report

    model = load_model(root)
    with pytest.raises(ValueError, match="output token ' zzzqqq': ' zzzqqq' is 7 tokens"):
        build_report(model, tokens=[" zzzqqq"], texts=["Lily was happy."])
    with pytest.raises(ValueError, match="input token ' zzzqqq'"):
        build_report(model, input_tokens=[" not", " zzzqqq"], texts=["Lily was happy."])
    with pytest.raises(ValueError, match="n_eigenvectors must be an integer >= 1, got 0"):
        build_report(model, n_eigenvectors=0, texts=["Lily was happy."])


def test_python_layer_and_empty_inputs_are_value_errors():
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match=r"layer must be an int block index in \[0, 2\), got '0'"):
        layer_eigendecomposition(model, "0", 3)
    with pytest.raises(ValueError, match=r"tokens must hold at least one token, got shape \(1, 0\)"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty list of texts or a \\[batch, pos\\] token tensor, got an empty list"):
        model([])
