"""Issue 24.4: ``EigenAtlas`` checks what it reads. An edited ``index.json`` (reversed labels,
another ``k``, a ``shard_size`` of 0 or ``"64"``, ...) fails with one line naming the index
and the field, never returns another row's eigenpairs or a raw ZeroDivisionError / TypeError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bilinear_lens.models.model import build_model
from bilinear_lens.weights.atlas import model_atlas
from bilinear_lens.weights.atlas_store import INDEX_FILE, SHARD_RECORD, AtlasError, EigenAtlas
from conftest import tiny_config

TOKENS = [3, 5, 7, 11, 13, 17]


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("atlas") / "a"
    model_atlas(build_model(tiny_config(d_vocab=40)), out, tokens=TOKENS, layers=[0], k=3, shard_size=4, progress=False)
    return out


def edited(atlas_dir: Path, tmp_path: Path, **fields) -> Path:
    """A copy of the atlas whose index has ``fields`` replaced (shards untouched)."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(atlas_dir, copy)
    index = json.loads((copy / INDEX_FILE).read_text())
    index.update(fields)
    (copy / INDEX_FILE).write_text(json.dumps(index))
    return copy


def test_shards_record_the_labels_of_their_rows(atlas_dir) -> None:
    records = [json.loads((atlas_dir / name / SHARD_RECORD).read_text()) for name in ("layer00-0000000", "layer00-0000004")]
    assert [r["labels"] for r in records] == [TOKENS[:4], TOKENS[4:]]
    atlas = EigenAtlas(atlas_dir)
    for token in TOKENS:  # an unedited atlas reads every row
        assert atlas.entry(0, token=token).eig.eigenvalues.shape == (3,)


def test_reversed_labels_never_return_another_tokens_pairs(atlas_dir, tmp_path) -> None:
    atlas = EigenAtlas(edited(atlas_dir, tmp_path, labels=TOKENS[::-1]))
    with pytest.raises(AtlasError) as err:
        atlas.entry(0, token=17)  # row 0 after the edit: it holds token 3's pairs
    message = str(err.value)
    assert "\n" not in message
    assert f"{INDEX_FILE} labels rows 0:4 as [17, 13, 11, 7], but shard" in message
    assert "was written for labels [3, 5, 7, 11]" in message and "the index was edited" in message


def test_edited_k_is_refused_not_reported(atlas_dir, tmp_path) -> None:
    atlas = EigenAtlas(edited(atlas_dir, tmp_path, k=8))
    with pytest.raises(AtlasError, match=r"holds eigenvalues of shape \(4, 3\), but .*index.json \(k = 8, d = 32\) says \(4, 8\)"):
        atlas.entry(0, token=3)


@pytest.mark.parametrize("field, value, why", [
    ("shard_size", 0, "shard_size = 0 must be an integer >= 1"),
    ("shard_size", "64", "shard_size = '64' must be an integer >= 1"),
    ("shard_size", True, "shard_size = True must be an integer >= 1"),
    ("k", None, "k = None must be an integer >= 1"),
    ("n_dirs", -1, "n_dirs = -1 must be an integer >= 1"),
    ("layers", "0", "layers = '0' must be a non-empty list of distinct layer indices"),
    ("layers", [0, 0], "layers = [0, 0] must be a non-empty list"),
    ("labels", [3, 5], "labels = [3, 5] must hold n_dirs = 6 labels, one per row, not 2"),
    ("labels", [3, 3, 5, 7, 11, 13], "must not repeat a label"),
    ("labels", "abc", "labels = 'abc' must be null or a list of integers"),
    ("fingerprint", 7, "fingerprint = 7 must be a string"),
])
def test_malformed_index_fields_are_one_line_errors(atlas_dir, tmp_path, field, value, why) -> None:
    path = edited(atlas_dir, tmp_path, **{field: value})
    with pytest.raises(AtlasError) as err:
        EigenAtlas(path)
    message = str(err.value)
    assert message.startswith(f"atlas index {path / INDEX_FILE}: ") and why in message and "\n" not in message


def test_other_valid_shard_size_or_n_dirs_does_not_read_wrong_rows(atlas_dir, tmp_path) -> None:
    atlas = EigenAtlas(edited(atlas_dir, tmp_path, shard_size=3))
    with pytest.raises(AtlasError, match="incomplete: shard layer00-0000003 is missing"):
        atlas.entry(0, token=11)
    (tmp_path / "edited").rename(tmp_path / "first")
    atlas = EigenAtlas(edited(atlas_dir, tmp_path, n_dirs=5, labels=TOKENS[:5]))
    with pytest.raises(AtlasError, match=r"holds layer 0 rows 4:6, not layer 0 rows 4:5"):
        atlas.entry(0, token=13)
    torch.testing.assert_close(atlas.entry(0, token=3).eig.eigenvalues, EigenAtlas(atlas_dir).entry(0, token=3).eig.eigenvalues,
                               rtol=0, atol=0)  # the rows the index still describes correctly read as before
