"""bilinear-lens: weight-based mechanistic interpretability for bilinear transformers.

A TransformerLens 4 plugin: build or train small transformers whose MLPs are bilinear
(or ReLU/GELU/SwiGLU/linear baselines), read what the bilinear layers compute from
their weights, and check the reading with hooks on real activations.

The core (config, MLPs, model, checkpoints) is imported eagerly; everything else is
imported on first use, so ``import bilinear_lens`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from bilinear_lens.checkpoint import CheckpointError, load_model, save_model
from bilinear_lens.config import ModelConfig
from bilinear_lens.hook_names import UnknownHookError
from bilinear_lens.mlp import MLP, BilinearMLP, GatedMLP, make_mlp
from bilinear_lens.model import BilinearTransformer, build_model, next_token_loss

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily)
_LAZY: dict[str, str] = {}
for _module, _names in {
    "bridge": ["to_bridge", "load_bridge", "BilinearLensArchitectureAdapter", "ARCHITECTURE_NAME"],
    "config": ["DataConfig", "TrainConfig", "RunConfig", "load_run_config"],
    "train": ["train", "TrainResult", "NonFiniteLossError"],
    "data": ["prepare_data", "TokenBlocks", "load_texts"],
    "synthetic": ["synthetic_stories", "word_class"],
    "tokenizer": ["train_tokenizer", "load_tokenizer", "save_tokenizer", "to_hf_tokenizer"],
    "tensor": [
        "BilinearWeights", "bilinear_tensor", "bilinear_output", "interaction_matrix", "interaction_matrices",
        "iter_interaction_matrices", "interaction", "quadratic_form", "augment_input",
    ],
    "eigen": [
        "Eigendecomposition", "eigendecompose", "eigendecompose_directions", "top_eigenvectors",
        "interaction_operator", "low_rank_approximation", "low_rank_error", "low_rank_output",
        "low_rank_correlation", "eigenvector_activations",
    ],
    "directions": [
        "token_direction", "token_directions", "logit_diff_direction", "vector_direction",
        "feature_direction", "resolve_direction",
    ],
    "eigen_readings": [
        "layer_eigendecomposition", "eigenvector_activations_on_tokens", "rank_k_correlation_on_tokens",
        "top_tokens_for_eigenvectors", "mlp_inputs", "LayerEigen",
    ],
    "ablation": [
        "ablate_neurons", "neuron_ablation_hook", "ablate_direction", "direction_ablation_hook",
        "ablate_eigencomponents", "eigen_ablation_hooks", "ablation_sweep", "patch_neurons", "NeuronTable",
    ],
    "spline_codes": ["spline_codes", "pack_bits", "pack_signs", "unpack_bits", "hamming", "region_ids", "residual_codes"],
    "region_counts": ["RegionCounts"],
    "polytope": [
        "RegionTracker", "track_regions", "region_summary", "embedding_path_profile", "residual_path_profile",
        "purity", "purity_report", "compare_purity", "kmeans",
    ],
    "toy": [
        "ToyConfig", "ToyModel", "train_toy_model", "random_rotation", "rotation_invariance",
        "alignment_score", "model_alignment_score",
    ],
    "report": ["build_report", "write_report"],
}.items():  # fmt: skip
    for _name in _names:
        _LAZY[_name] = f"bilinear_lens.{_module}"

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
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bilinear_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
