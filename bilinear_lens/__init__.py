"""bilinear-lens: weight-based mechanistic interpretability for bilinear transformers.

A TransformerLens 4 plugin: build or train small transformers whose MLPs are bilinear
(or ReLU/GELU/SwiGLU/linear baselines), read what the bilinear layers compute from
their weights, and check the reading with hooks on real activations.
"""

from bilinear_lens.checkpoint import CheckpointError, load_model, save_model
from bilinear_lens.config import ModelConfig
from bilinear_lens.hook_names import UnknownHookError
from bilinear_lens.mlp import MLP, BilinearMLP, GatedMLP, make_mlp
from bilinear_lens.model import BilinearTransformer, build_model, next_token_loss

__version__ = "0.1.0"

__all__ = [
    "BilinearMLP",
    "BilinearTransformer",
    "CheckpointError",
    "GatedMLP",
    "MLP",
    "ModelConfig",
    "UnknownHookError",
    "build_model",
    "load_model",
    "make_mlp",
    "next_token_loss",
    "save_model",
]


def __getattr__(name: str):  # lazy: importing the bridge pulls in TransformerBridge machinery
    if name in ("to_bridge", "load_bridge"):
        from bilinear_lens import bridge

        return getattr(bridge, name)
    raise AttributeError(f"module 'bilinear_lens' has no attribute {name!r}")
