"""bilinear-lens: weight-based mechanistic interpretability for bilinear transformers.

A TransformerLens 4 plugin: build or train small transformers whose MLPs are bilinear
(or ReLU/GELU/SwiGLU/linear baselines), read what the bilinear layers compute from
their weights, and check the reading with hooks on real activations.

Subpackages: ``models`` (config, MLPs, the transformer, checkpoints, the TransformerLens
bridge), ``data`` (synthetic stories, tokenizer, token cache), ``training`` (recipes, the
loop, training state), ``weights`` (weight-only analysis: the bilinear tensor, eigen,
directions), ``activations`` (hook-based analysis: eigen readings, ablation, spline codes,
polytopes), ``views`` (circuitsvis, figures, the HTML report), ``sae`` (SAELens-format sparse
autoencoders, their features as directions and bases, a top-k trainer), ``commands`` (the CLI).
Everything public is importable from the top level, lazily (PEP 562): ``_PUBLIC`` maps each
public name to its module, which is imported on first access, so ``import bilinear_lens`` and
the CLI's ``--help``/``--version`` do not pay for torch and TransformerLens.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# module -> the public names it provides; the one table behind __all__, __getattr__ and __dir__
_MODULES: dict[str, tuple[str, ...]] = {
    "bilinear_lens.files.serialized": ("CheckpointError",),
    "bilinear_lens.models.hf_llama": (
        "check_llama_expressible", "llama_config_dict", "model_config_from_llama", "to_llama_state_dict",
        "from_llama_state_dict",
    ),
    "bilinear_lens.models.hub": ("resolve_model_dir", "push_model_dir",),
    "bilinear_lens.models.paper_checkpoints": (
        "read_paper_checkpoint", "convert_paper_state_dict", "paper_model_config", "detect_paper_format",
    ),
    "bilinear_lens.models.sampling": ("sample_next_token", "filter_logits",),
    "bilinear_lens.models.config": ("ModelConfig",),
    "bilinear_lens.models.hook_names": ("UnknownHookError", "hf_hook_equivalent"),
    "bilinear_lens.models.mlp": ("MLP", "BilinearMLP", "GatedMLP", "make_mlp",),
    "bilinear_lens.models.mlp_kinds": ("MLP_KINDS", "MLPKind", "mlp_kind_spec",),
    "bilinear_lens.models.protocol": ("HookedModel",),
    "bilinear_lens.models.model": (
        "BilinearTransformer", "build_model", "load_model", "next_token_loss", "model_from_state_dict",
        "load_paper_checkpoint",
    ),
    # the model-directory formats as data (issue 22 item 2)
    "bilinear_lens.models.loading": (
        "save_model", "load_config", "read_model_files", "ModelFiles", "detect_model_format", "MODEL_FORMATS",
    ),
    "bilinear_lens.models.bridge": (
        "to_bridge", "load_bridge", "BilinearLensArchitectureAdapter", "ARCHITECTURE_NAME", "boot_export",
        "HFGatedMLPBridge",
    ),
    "bilinear_lens.training.config": ("DataConfig", "TrainConfig", "RunConfig", "load_run_config",),
    "bilinear_lens.training.loop": ("train", "TrainResult", "NonFiniteLossError", "Trainer", "TrainTask",),
    "bilinear_lens.locking": ("LockHeldError",),
    "bilinear_lens.data.corpus": ("prepare_data", "TokenBlocks", "load_texts",),
    "bilinear_lens.data.synthetic": ("synthetic_stories", "word_class",),
    "bilinear_lens.data.documents": ("split_text", "DOCUMENT_RULES"),
    "bilinear_lens.data.tokenizer": (
        "train_tokenizer", "load_tokenizer", "save_tokenizer", "to_hf_tokenizer", "load_model_tokenizer",
    ),
    "bilinear_lens.weights.tensor": (
        "BilinearWeights", "bilinear_tensor", "bilinear_output", "interaction_matrix",
        "interaction_matrices", "iter_interaction_matrices", "interaction", "quadratic_form",
        "augment_input",
    ),
    "bilinear_lens.weights.packed_tensor": ("PackedSymmetricTensor", "packed_size",),
    "bilinear_lens.weights.eigen": (
        "EigenConvergenceError", "choose_method", "Eigendecomposition", "eigendecompose",
        "eigendecompose_directions", "top_eigenvectors", "interaction_operator",
        "low_rank_approximation", "low_rank_error", "low_rank_output", "low_rank_correlation",
        "eigenvector_activations",
    ),
    "bilinear_lens.weights.batched_eigen": ("batched_top_eigenpairs", "BatchedTopK",),
    "bilinear_lens.weights.atlas": ("build_atlas", "model_atlas",),
    "bilinear_lens.weights.atlas_store": ("EigenAtlas", "AtlasEntry", "AtlasError",),
    "bilinear_lens.weights.directions": (
        "token_direction", "token_directions", "logit_diff_direction", "vector_direction",
        "feature_direction", "resolve_direction", "FeatureDirection", "sae_feature_direction",
    ),
    "bilinear_lens.weights.layer_eigen": ("layer_eigendecomposition", "top_tokens_for_eigenvectors", "LayerEigen",),
    "bilinear_lens.activations.eigen_readings": (
        "eigenvector_activations_on_tokens", "rank_k_correlation_on_tokens", "mlp_inputs",
    ),
    "bilinear_lens.activations.capture": ("capture_activations", "run_capturing",),
    "bilinear_lens.activations.ablation": (
        "ablate_neurons", "neuron_ablation_hook", "ablate_direction", "direction_ablation_hook",
        "ablate_eigencomponents", "eigen_ablation_hooks", "ablation_sweep", "patch_neurons",
        "NeuronTable",
    ),
    "bilinear_lens.activations.spline_codes": (
        "spline_codes", "pack_bits", "pack_signs", "unpack_bits", "hamming", "region_ids",
        "residual_codes",
    ),
    "bilinear_lens.activations.region_counts": ("RegionCounts",),
    "bilinear_lens.activations.polytope": (
        "RegionTracker", "track_regions", "region_summary", "embedding_path_profile",
        "residual_path_profile", "purity", "purity_report", "compare_purity",
    ),
    "bilinear_lens.activations.kmeans": ("kmeans",),
    "bilinear_lens.toy": (
        "ToyConfig", "ToyModel", "train_toy_model", "random_rotation", "rotation_invariance",
        "alignment_score", "model_alignment_score",
    ),
    "bilinear_lens.views.report": ("build_report", "write_report",),
    # one measured text for CLI, report and notebooks (issue 25 item 5)
    "bilinear_lens.training.measured_text": ("measured_rows", "measured_text", "MeasuredRows", "MeasuredText", "MeasuredTextError"),
    "bilinear_lens.sae.config": ("SAEConfig", "SAEConfigError",),
    "bilinear_lens.sae.model": ("SAE", "load_sae", "save_sae", "check_sae_fits_model", "hf_hook_name_mapped"),
    "bilinear_lens.sae.features": (
        "input_feature_basis", "feature_interaction_matrix", "eigenvector_input_features",
        "FeatureInteractions", "EigenvectorFeatures",
    ),
    "bilinear_lens.sae.ablation": ("feature_ablation_sweep",),
    "bilinear_lens.sae.recipe": ("SAERecipe", "SAESpec", "load_sae_recipe",),
    "bilinear_lens.sae.train": ("train_sae", "SAETrainResult", "SAETraining", "tangent_decoder_gradients",),
    # circuits across the whole model (issue 20)
    "bilinear_lens.circuits.writers": ("ResidualWriters", "residual_writers", "sae_writers"),
    "bilinear_lens.circuits.pairs": ("PairDecomposition", "mlp_pair_decomposition"),
    "bilinear_lens.circuits.qk_pairs": ("QKPairs", "qk_pair_attribution"),
    "bilinear_lens.circuits.path_interactions": ("PathInteractions", "path_interactions"),
    "bilinear_lens.circuits.patching": ("batched_activation_patch", "patch_grid", "GridResult"),
    "bilinear_lens.circuits.patch_nodes": ("NodeFamily", "EigenFamily", "node_family", "eigen_family"),
    "bilinear_lens.circuits.attribution_patching": ("attribution_patching", "AttributionPatchingResult"),
    "bilinear_lens.circuits.freezing": ("freeze_hooks", "frozen_hook_names"),
    "bilinear_lens.circuits.linearized": (
        "linearized", "linearization_hooks", "record_frozen_values", "FrozenValues", "check_exact_mlps",
        "gradient_times_input",
    ),
    "bilinear_lens.circuits.graph": (
        "attribution_graph", "AttributionGraph", "GraphNode", "GraphTarget", "top_logit_targets", "direction_target",
    ),
    "bilinear_lens.circuits.graph_prune": ("prune_graph", "prune_adjacency", "PruneResult"),
    "bilinear_lens.circuits.graph_export": ("graph_to_json", "write_graph_json"),
    "bilinear_lens.views.pair_view": ("pair_matrix_html", "pair_matrix_figure"),
    "bilinear_lens.views.patching_view": ("PatchingHeatmap",),
    "bilinear_lens.views.graph_view": ("GraphView", "graph_html"),
    # reliability (issue 24)
    "bilinear_lens.disk_errors": ("DiskWriteError", "disk_write_error"),
    "bilinear_lens.field_errors": ("FieldError", "FieldMessage"),
    "bilinear_lens.output_locks": ("claim_atlas_dir", "claim_export_dir", "finish_interrupted_replace"),
    "bilinear_lens.tensor_checksum": ("tensors_sha256",),
    # image classifiers (issue 23)
    "bilinear_lens.models.image_classifier": (
        "ImageClassifier", "ImageClassifierConfig", "save_image_classifier", "load_image_classifier",
    ),
    "bilinear_lens.data.images": ("ImageData", "load_image_dataset", "read_idx", "write_idx", "check_images"),
    "bilinear_lens.training.image_train": (
        "ImageRecipe", "ImageDataSpec", "ImageTraining", "ImageTrainResult", "load_image_recipe",
        "train_image_classifier",
    ),
    "bilinear_lens.weights.image_eigen": (
        "ClassEigen", "class_eigendecomposition", "pixel_interaction_matrices", "last_layer_eigendecomposition",
        "low_rank_logits", "low_rank_accuracy", "spectral_concentration", "effective_rank", "total_variation",
        "eigen_summary", "pixel_participation", "neighbour_correlation",
    ),
    "bilinear_lens.weights.adversarial_masks": (
        "PairEigen", "pair_eigen", "eigen_masks", "gradient_masks", "random_masks", "flip_rate", "compare_attacks",
    ),
    "bilinear_lens.views.image_plots": (
        "plot_class_eigenvectors", "plot_eigen_grid", "plot_class_spectra", "image_report", "write_image_report",
    ),
    "bilinear_lens.activations.code_subsets": (
        "choose_units", "subset_codes", "subset_layout", "nearest_neighbour_hamming",
    ),
    "bilinear_lens.activations.code_clusters": ("CodeClusters", "cluster_codes", "unpacked_codes"),
    # the local corpus file a run was trained on (its fingerprint beside the recorded recipe)
    "bilinear_lens.data.fingerprint": ("FileFingerprint", "fingerprint_file", "read_fingerprint"),
}

_PUBLIC: dict[str, str] = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Import the public name's module on first access and cache the value in the package."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
