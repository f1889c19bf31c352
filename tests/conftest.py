"""Shared fixtures: tiny models (d_model <= 64) so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.mlp_kinds import MLP_KIND_NAMES

MLP_KINDS = list(MLP_KIND_NAMES)


# The same float32 computation in another order or another wrapper (the bridge vs our model,
# a forward restarted mid-way, a padded batch vs one text): measured differences are <= 1.1e-7
# on tiny_config logits of size ~0.4 (a few ulps of float32 through two blocks); 1e-5 is a
# 100x margin for other BLAS kernels and thread counts, and still far below any real bug.
FLOAT32_REORDERED = dict(rtol=1e-5, atol=1e-5)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(d_vocab=97, d_model=32, n_layers=2, n_heads=4, d_mlp=48, n_ctx=16, seed=0)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
