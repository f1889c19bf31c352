"""Eigen-readings on real activations agree with the MLP computed through hooks."""

import pytest
import torch

from bilinear_lens.models.bridge import to_bridge
from bilinear_lens.weights.directions import token_direction
from bilinear_lens.activations.eigen_readings import (
    eigenvector_activations_on_tokens,
    mlp_inputs,
    rank_k_correlation_on_tokens,
)
from bilinear_lens.weights.layer_eigen import layer_eigendecomposition, top_tokens_for_eigenvectors
from bilinear_lens.models.model import build_model
from conftest import tiny_config


@pytest.fixture
def model():
    return build_model(tiny_config(dtype="float64", seed=4))


def test_activations_sum_to_direction_output(model, tokens):
    le = layer_eigendecomposition(model, 1, 5)
    acts = eigenvector_activations_on_tokens(model, tokens, le)
    assert acts.shape == (3, 11, 32)
    _, cache = model.run_with_cache(tokens)
    true = cache["blocks.1.mlp.hook_out"] @ token_direction(model, 5)
    torch.testing.assert_close(acts.sum(-1), true, rtol=1e-9, atol=1e-12)


def test_full_rank_correlation_is_one_and_matches_bridge(model, tokens):
    le = layer_eigendecomposition(model, 0, (3, 4))
    corr = rank_k_correlation_on_tokens(model, tokens, le, ks=(1, 4, 32))
    assert corr[32] == pytest.approx(1.0, abs=1e-9)
    assert -1 <= corr[1] <= 1
    bridge = to_bridge(model)
    torch.testing.assert_close(mlp_inputs(bridge, tokens, 0), mlp_inputs(model, tokens, 0))
    le_bridge = layer_eigendecomposition(bridge, 0, le.direction)
    torch.testing.assert_close(le_bridge.eigenvalues, le.eigenvalues)


def test_matrix_free_matches_dense(model):
    dense = layer_eigendecomposition(model, 0, 7, k=4)
    lanczos = layer_eigendecomposition(model, 0, 7, k=4, method="lanczos")
    torch.testing.assert_close(lanczos.eigenvalues, dense.eigenvalues, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [({"n_tokens": -1}, "n_tokens must be an integer >= 1, got -1"),
                                             ({"n_vectors": 0}, "n_vectors must be an integer >= 1, got 0")])
def test_top_tokens_refuses_counts_below_one(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        top_tokens_for_eigenvectors(model, layer_eigendecomposition(model, 0, 2), **kwargs)


def test_top_tokens_are_extremes_of_projection(model):
    le = layer_eigendecomposition(model, 0, 2)
    tops = top_tokens_for_eigenvectors(model, le, n_vectors=3, n_tokens=4)
    assert len(tops) == 3
    E = model.blocks[0].ln2(model.W_E)
    scores = (E @ le.eigenvectors[:, 1]).detach()
    assert tops[1].positive_ids == scores.topk(4).indices.tolist()
    assert tops[1].negative_ids == (-scores).topk(4).indices.tolist()
    assert tops[1].positive_scores[0] == pytest.approx(float(scores.max()))
    # a mask restricts the candidates
    mask = torch.zeros(97, dtype=torch.bool)
    mask[[3, 5, 7]] = True
    masked = top_tokens_for_eigenvectors(model, le, n_vectors=1, n_tokens=5, token_mask=mask)[0]
    assert sorted(masked.positive_ids) == [3, 5, 7]
    first = (E @ le.eigenvectors[:, 0]).detach()
    assert masked.positive_ids == sorted([3, 5, 7], key=lambda i: -float(first[i]))


def test_errors(tokens):
    relu = build_model(tiny_config(mlp_kind="relu"))
    with pytest.raises(ValueError, match="'relu' MLP; interaction matrices need a bilinear MLP"):
        layer_eigendecomposition(relu, 0, 1)
    with pytest.raises(ValueError, match="layer 5 is out of range: the model has 2 layers"):
        layer_eigendecomposition(build_model(tiny_config()), 5, 1)


def test_eigen_cli(tmp_path, capsys, story_tokenizer):
    import json

    from bilinear_lens.cli import main

    tok = story_tokenizer
    assert len(tok.encode(" happy", add_special_tokens=False)) == 1
    model = build_model(tiny_config(d_vocab=len(tok)), tokenizer=tok)
    model.save_pretrained(tmp_path / "m")
    assert main(["eigen", "--checkpoint", str(tmp_path / "m"), "--token", " happy", "--top", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["eigenvectors"]) == 3
    lambdas = [abs(r["eigenvalue"]) for r in out["eigenvectors"]]
    assert lambdas == sorted(lambdas, reverse=True)
    le = layer_eigendecomposition(model, 0, " happy")
    assert out["eigenvectors"][0]["eigenvalue"] == pytest.approx(float(le.eigenvalues[0]), rel=1e-5)
    assert main(["eigen", "--checkpoint", str(tmp_path / "m"), "--logit-diff", " happy", " sad", "--top", "2"]) == 0
    assert "lambda" in capsys.readouterr().out
    assert main(["eigen", "--checkpoint", str(tmp_path / "m"), "--token", " happy sad"]) == 2
    assert "not one" in capsys.readouterr().err
    assert main(["eigen", "--checkpoint", str(tmp_path / "missing"), "--token", "1"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
