"""Output directions read exactly the direct-path logit effect of a layer's output."""

import pytest
import torch

from bilinear_lens.weights.directions import (
    feature_direction,
    logit_diff_direction,
    resolve_direction,
    token_direction,
    token_directions,
    token_id,
    vector_direction,
)
from bilinear_lens.models.model import build_model
from conftest import tiny_config


@pytest.mark.parametrize("norm", ["RMSPre", "RMS", "LN", "LNPre", None])
def test_direction_reads_logit_change_with_frozen_norm_scale(norm):
    """With the final norm's scale frozen (direct logit attribution, as TransformerLens
    does with a cached scale), adding y to the residual changes logit t by (u_t . y) / scale."""
    torch.manual_seed(0)
    model = build_model(tiny_config(normalization_type=norm, dtype="float64"))
    if norm in ("RMS", "LN"):
        with torch.no_grad():
            model.ln_final.weight.normal_()
            if norm == "LN":
                model.ln_final.bias.normal_()
    resid = torch.randn(5, 32, dtype=torch.float64)
    y = torch.randn(32, dtype=torch.float64)
    if norm is None:
        scale = torch.ones(5, 1, dtype=torch.float64)
        change = model.unembed(model.ln_final(resid + y)) - model.unembed(model.ln_final(resid))
    else:
        cached = {}
        model.ln_final.hook_scale.add_hook(lambda t, hook: cached.setdefault("s", t.detach()))
        base = model.unembed(model.ln_final(resid))
        model.ln_final.hook_scale.remove_hooks()
        scale = cached["s"]
        model.ln_final.hook_scale.add_hook(lambda t, hook: scale)
        shifted = model.unembed(model.ln_final(resid + y))
        model.ln_final.hook_scale.remove_hooks()
        change = shifted - base
    U = token_directions(model)  # [vocab, d_model]
    torch.testing.assert_close(change, (y @ U.T)[None] / scale, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(token_direction(model, 7), U[7])


def test_logit_diff_and_resolve():
    model = build_model(tiny_config())
    u = logit_diff_direction(model, 3, 5)
    torch.testing.assert_close(u, token_direction(model, 3) - token_direction(model, 5))
    torch.testing.assert_close(resolve_direction(model, (3, 5)), u)
    torch.testing.assert_close(resolve_direction(model, 3), token_direction(model, 3))
    v = torch.randn(32)
    torch.testing.assert_close(resolve_direction(model, v), v)
    dec = torch.randn(10, 32)
    torch.testing.assert_close(feature_direction(dec, 4), dec[4])


def test_errors():
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match=r"token id 97 is out of range \[0, 97\)"):
        token_id(model, 97)
    with pytest.raises(ValueError, match="no tokenizer"):
        token_id(model, " happy")
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        vector_direction(model, torch.zeros(31))
    with pytest.raises(ValueError, match="NaN"):
        vector_direction(model, torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="feature index 10 out of range"):
        feature_direction(torch.zeros(10, 32), 10)


def test_zero_directions_are_refused():
    """A logit difference of a token with itself (or a zero vector) reads nothing: before,
    eigen returned lambda = 0 and arbitrary eigenvectors as if they meant something."""
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match=r"logit difference of 3 and 3: the same token, a zero direction"):
        resolve_direction(model, (3, 3))
    with pytest.raises(ValueError, match="the direction of the given vector is zero"):
        resolve_direction(model, torch.zeros(32))


def test_token_strings_are_text_not_ids():
    """'42' is the text "42" (ids are ints): a model without a tokenizer cannot look it up."""
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="cannot look up token '42'"):
        token_direction(model, "42")
