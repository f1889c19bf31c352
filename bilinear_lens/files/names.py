"""Every file and directory name the package writes or looks for, in one place.

Model directory (:mod:`bilinear_lens.models.checkpoint`, :mod:`bilinear_lens.data.tokenizer`)::

    config.json  model.safetensors  tokenizer.json  [tokenizer_config.json, ...: HF layout]

Training checkpoint (:mod:`bilinear_lens.training.state`): a model directory plus
``train_state.safetensors``, ``train_state.json`` and ``run_config.toml`` (and
``data_fingerprint.json`` when trained on a local file).

Run directory (:mod:`bilinear_lens.training.run_dir`, :mod:`bilinear_lens.sae.train`)::

    checkpoints/step_NNNNNN/  final/  metrics.jsonl  run_config.toml | sae_recipe.json  .lock
    [data_fingerprint.json]

SAE directory (SAELens' layout, :mod:`bilinear_lens.sae.config`): ``cfg.json``,
``sae_weights.safetensors``. Eigen atlas (:mod:`bilinear_lens.weights.atlas_store`):
``index.json`` and shard directories holding ``eigen.safetensors`` + ``shard.json``.
"""

from __future__ import annotations

# ---- a model directory ----
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Every file a model directory written by this package can hold (ours and the HF layout,
# with or without tokenizer files): an existing directory holding only these (and the files
# being written) is a previous model directory, which a new one may replace.
MODEL_DIR_FILES = frozenset({
    CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
})

# ---- a training checkpoint: the model files plus the train state and the recipe ----
TRAIN_STATE_TENSORS_FILE = "train_state.safetensors"
TRAIN_STATE_JSON_FILE = "train_state.json"
RUN_CONFIG_FILE = "run_config.toml"
# the local corpus file the run was trained on (path, size, sha256: bilinear_lens.data.fingerprint)
DATA_FINGERPRINT_FILE = "data_fingerprint.json"
# What a previous training checkpoint at the same path may hold (it is replaced; anything
# else there is refused, see atomic_directory): model files, train state, the recipe.
CHECKPOINT_DIR_FILES = MODEL_DIR_FILES | {TRAIN_STATE_TENSORS_FILE, TRAIN_STATE_JSON_FILE, RUN_CONFIG_FILE,
                                          DATA_FINGERPRINT_FILE}

# ---- a training or SAE run directory ----
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
SAE_RECIPE_FILE = "sae_recipe.json"
# Entries that mark a training / SAE run directory (named in the overwrite refusal).
RUN_DIR_MARKERS = frozenset({CHECKPOINTS_DIR, METRICS_FILE, RUN_CONFIG_FILE, LOCK_FILE, FINAL_DIR, SAE_RECIPE_FILE})

# ---- an SAE directory (SAELens' layout) ----
SAE_CFG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"

# ---- an eigen atlas ----
ATLAS_INDEX_FILE = "index.json"
ATLAS_SHARD_TENSORS = "eigen.safetensors"
ATLAS_SHARD_RECORD = "shard.json"
