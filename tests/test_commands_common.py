"""Shared command helpers: text files read one way (UTF-8), hook names built one way."""

import pytest

from bilinear_lens.commands.common import UsageError, read_documents, read_text_file
from bilinear_lens.models.hook_names import check_layer, mlp_hook_name
from bilinear_lens.models.model import build_model
from conftest import tiny_config


def test_documents_are_blank_line_separated_and_stripped(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("  Lily was happy. \n\n\n\nTom was sad.\nThe end.\n\n   \n", encoding="utf-8")
    assert read_documents(str(path), 10) == ["Lily was happy.", "Tom was sad.\nThe end."]
    assert read_documents(str(path), 1) == ["Lily was happy."]


def test_text_files_are_utf8(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("caf\u00e9 \u2014 na\u00efve", encoding="utf-8")
    assert read_text_file(str(path)) == "caf\u00e9 \u2014 na\u00efve"
    path.write_bytes(b"caf\xe9")  # latin-1, not UTF-8
    with pytest.raises(UsageError, match=r"text file .*t\.txt is not UTF-8"):
        read_text_file(str(path))


def test_missing_and_empty_text_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="text file not found: .*nope.txt"):
        read_documents(str(tmp_path / "nope.txt"), 5)
    (tmp_path / "blank.txt").write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(UsageError, match="holds no text"):
        read_documents(str(tmp_path / "blank.txt"), 5)


@pytest.mark.parametrize("hook", ["hook_in", "hook_pre", "hook_pre_linear", "hook_post", "hook_out"])
def test_mlp_hook_names_are_the_models(hook):
    model = build_model(tiny_config())
    assert mlp_hook_name(1, hook) == mlp_hook_name(1, hook.removeprefix("hook_")) == f"blocks.1.mlp.{hook}"
    assert mlp_hook_name(1, hook) in model.hook_dict


def test_layer_checks_name_the_range():
    model = build_model(tiny_config())
    assert check_layer(model, 1) == 1
    with pytest.raises(ValueError, match=r"layer 2 is out of range: the model has 2 layers \[0, 2\)"):
        check_layer(model, 2)
    with pytest.raises(ValueError, match=r"layer must be an int block index in \[0, 2\), got True"):
        check_layer(model, True)
