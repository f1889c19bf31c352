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
Everything public is importable from the top level. (Importing the package costs what
importing TransformerLens costs, which the model needs anyway.)
"""

from __future__ import annotations

from bilinear_lens.models.checkpoint import CheckpointError
from bilinear_lens.models.hf_llama import check_llama_expressible, llama_config_dict, model_config_from_llama, to_llama_state_dict, from_llama_state_dict
from bilinear_lens.models.hub import resolve_model_dir, push_model_dir
from bilinear_lens.models.paper_checkpoints import load_paper_checkpoint, convert_paper_state_dict, paper_model_config, detect_paper_format
from bilinear_lens.models.sampling import sample_next_token, filter_logits
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.hook_names import UnknownHookError
from bilinear_lens.models.mlp import MLP, BilinearMLP, GatedMLP, make_mlp
from bilinear_lens.models.mlp_kinds import MLP_KINDS, MLPKind, mlp_kind_spec
from bilinear_lens.models.protocol import HookedModel
from bilinear_lens.models.model import BilinearTransformer, build_model, load_model, next_token_loss, save_model, model_from_state_dict
from bilinear_lens.models.bridge import to_bridge, load_bridge, BilinearLensArchitectureAdapter, ARCHITECTURE_NAME
from bilinear_lens.training.config import DataConfig, TrainConfig, RunConfig, load_run_config
from bilinear_lens.training.loop import train, TrainResult, NonFiniteLossError, Trainer, TrainTask
from bilinear_lens.locking import LockHeldError
from bilinear_lens.data.corpus import prepare_data, TokenBlocks, load_texts
from bilinear_lens.data.synthetic import synthetic_stories, word_class
from bilinear_lens.data.tokenizer import train_tokenizer, load_tokenizer, save_tokenizer, to_hf_tokenizer, load_model_tokenizer
from bilinear_lens.weights.tensor import BilinearWeights, bilinear_tensor, bilinear_output, interaction_matrix, interaction_matrices, iter_interaction_matrices, interaction, quadratic_form, augment_input
from bilinear_lens.weights.packed_tensor import PackedSymmetricTensor, packed_size
from bilinear_lens.weights.eigen import EigenConvergenceError, choose_method, Eigendecomposition, eigendecompose, eigendecompose_directions, top_eigenvectors, interaction_operator, low_rank_approximation, low_rank_error, low_rank_output, low_rank_correlation, eigenvector_activations
from bilinear_lens.weights.batched_eigen import batched_top_eigenpairs, BatchedTopK
from bilinear_lens.weights.atlas import build_atlas, model_atlas
from bilinear_lens.weights.atlas_store import EigenAtlas, AtlasEntry, AtlasError
from bilinear_lens.weights.directions import token_direction, token_directions, logit_diff_direction, vector_direction, feature_direction, resolve_direction, FeatureDirection, sae_feature_direction
from bilinear_lens.activations.eigen_readings import layer_eigendecomposition, eigenvector_activations_on_tokens, rank_k_correlation_on_tokens, top_tokens_for_eigenvectors, mlp_inputs, LayerEigen
from bilinear_lens.activations.capture import capture_activations, run_capturing
from bilinear_lens.activations.ablation import ablate_neurons, neuron_ablation_hook, ablate_direction, direction_ablation_hook, ablate_eigencomponents, eigen_ablation_hooks, ablation_sweep, patch_neurons, NeuronTable
from bilinear_lens.activations.spline_codes import spline_codes, pack_bits, pack_signs, unpack_bits, hamming, region_ids, residual_codes
from bilinear_lens.activations.region_counts import RegionCounts
from bilinear_lens.activations.polytope import RegionTracker, track_regions, region_summary, embedding_path_profile, residual_path_profile, purity, purity_report, compare_purity, kmeans
from bilinear_lens.toy import ToyConfig, ToyModel, train_toy_model, random_rotation, rotation_invariance, alignment_score, model_alignment_score
from bilinear_lens.views.report import build_report, write_report
from bilinear_lens.sae.config import SAEConfig, SAEConfigError
from bilinear_lens.sae.model import SAE, load_sae, save_sae, check_sae_fits_model
from bilinear_lens.sae.features import input_feature_basis, feature_interaction_matrix, eigenvector_input_features, FeatureInteractions, EigenvectorFeatures
from bilinear_lens.sae.ablation import feature_ablation_sweep
from bilinear_lens.sae.recipe import SAERecipe, SAESpec, load_sae_recipe
from bilinear_lens.sae.train import train_sae, SAETrainResult, SAETraining, tangent_decoder_gradients
from bilinear_lens.disk_errors import DiskWriteError, disk_write_error
from bilinear_lens.output_locks import claim_atlas_dir, claim_export_dir, finish_interrupted_replace
from bilinear_lens.tensor_checksum import tensors_sha256

__version__ = "0.1.0"

__all__ = sorted(
    name
    for name, value in globals().items()
    if not name.startswith("_") and getattr(value, "__module__", "").startswith("bilinear_lens")
) + ["ARCHITECTURE_NAME", "MLP_KINDS"]
