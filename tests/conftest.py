"""Shared fixtures: tiny models (d_model <= 64) so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bilinear_lens.data.corpus import prepare_data
from bilinear_lens.training.config import RunConfig

from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.mlp_kinds import MLP_KIND_NAMES
from bilinear_lens.models.model import build_model

MLP_KINDS = list(MLP_KIND_NAMES)
REPO = Path(__file__).resolve().parents[1]


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


# --- a tiny training run (the trainer's tests and those of what it writes) ----------------


def recipe(cache_dir: Path, **train_overrides) -> dict:
    """A tiny recipe as a dict ([model] without d_vocab: taken from the tokenizer)."""
    return {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_mlp": 64, "n_ctx": 32, "seed": 0},
        "data": {"source": "synthetic", "vocab_size": 400, "max_docs": 1500, "val_fraction": 0.1,
                 "tokenizer_train_docs": 1500, "cache_dir": str(cache_dir)},
        "train": {"steps": 12, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
                  "log_every": 2, "eval_every": 4, "eval_batches": 2, "checkpoint_every": 0,
                  "keep_last": 3, "device": "cpu", "num_threads": 1, **train_overrides},
    }


def run_config(cache_dir: Path, **train_overrides) -> RunConfig:
    return RunConfig.from_dict(recipe(cache_dir, **train_overrides), where="test recipe")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Tokenizer and token cache built once; later prepare_data calls only read it."""
    path = tmp_path_factory.mktemp("data_cache")
    data = recipe(path)["data"]
    prepare_data("synthetic", vocab_size=data["vocab_size"], n_ctx=32, cache_dir=path,
                 val_fraction=data["val_fraction"], max_docs=data["max_docs"],
                 tokenizer_train_docs=data["tokenizer_train_docs"])
    return path


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- tokenizers and saved checkpoints, built once per session ------------------------------
# Tokenizer training lives in fixtures/tokenizers.py; tests never train one themselves. It is
# imported inside the fixtures: subprocess scripts import this file as tests.conftest, with
# the repository (not tests/) on sys.path, where ``fixtures`` is not importable.


@pytest.fixture(scope="session")
def small_tokenizer():
    """300 synthetic stories, vocab 300 (``len == 300``): real text for tests that need any tokenizer."""
    from fixtures.tokenizers import SMALL, stories_tokenizer

    return stories_tokenizer(*SMALL)


@pytest.fixture(scope="session")
def story_tokenizer():
    """2000 synthetic stories, vocab 700: words such as ``" happy"`` are one token."""
    from fixtures.tokenizers import STORY, stories_tokenizer

    return stories_tokenizer(*STORY)


@pytest.fixture(scope="session")
def saved_checkpoint(tmp_path_factory):
    """``saved_checkpoint(tokenizer="small", **config_overrides)`` -> a directory holding
    ``build_model(tiny_config(d_vocab=len(tok), **overrides), tokenizer=tok)``; the same
    arguments give the same directory. Read-only: a test that changes its files copies it
    (checked at the end of the session: the files, sizes and mtimes are still those written)."""
    from fixtures.tokenizers import SMALL, STORY, stories_tokenizer

    sizes = {"small": SMALL, "story": STORY}
    saved: dict[tuple, Path] = {}
    written: dict[Path, list] = {}

    def snapshot(path: Path) -> list:
        return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))

    def saved_checkpoint(tokenizer: str = "small", **overrides) -> Path:
        if tokenizer not in sizes:
            raise ValueError(f"tokenizer={tokenizer!r} is not a test tokenizer; allowed: {', '.join(sizes)}")
        key = (tokenizer, tuple(sorted(overrides.items())))
        if key not in saved:
            tok = stories_tokenizer(*sizes[tokenizer])
            model = build_model(tiny_config(d_vocab=len(tok), **overrides), tokenizer=tok)
            saved[key] = model.save_pretrained(tmp_path_factory.mktemp("checkpoint") / "m")
            written[saved[key]] = snapshot(saved[key])
        return saved[key]

    yield saved_checkpoint
    changed = [str(path) for path, files in written.items() if snapshot(path) != files]
    assert changed == [], f"tests changed the read-only saved_checkpoint directories {changed}; copy one first"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache with HF_HUB_OFFLINE set (fill it with ``fixtures.hub_cache.fill_cache``)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
