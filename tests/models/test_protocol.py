"""Our model and its TransformerBridge both meet the model contract of the analysis code."""

from bilinear_lens.models.bridge import to_bridge
from bilinear_lens.models.model import build_model
from bilinear_lens.models.protocol import HookedModel
from conftest import tiny_config


def test_model_and_bridge_are_hooked_models():
    model = build_model(tiny_config())
    assert isinstance(model, HookedModel)
    assert isinstance(to_bridge(model), HookedModel)


def test_a_plain_module_is_not_a_hooked_model():
    import torch

    assert not isinstance(torch.nn.Linear(2, 2), HookedModel)
