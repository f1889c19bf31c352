"""Shared command helpers: text files read one way (UTF-8) and cut into rows one way, hook
names built one way, help texts as plain text."""

import re

import pytest

from bilinear_lens.data.packing import document_stream
from bilinear_lens.commands.common import (
    UsageError,
    plain_text,
    read_documents,
    read_text_file,
    require_non_negative,
    require_positive,
    stream_rows,
)
from bilinear_lens.models.hook_names import check_layer, mlp_hook_name
from bilinear_lens.models.model import build_model
from conftest import tiny_config


def test_paragraph_documents_are_blank_line_separated_and_stripped(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("  Lily was happy. \n\n\n\nTom was sad.\nThe end.\n\n   \n", encoding="utf-8")
    assert read_documents(str(path), 10, "paragraph") == ["Lily was happy.", "Tom was sad.\nThe end."]
    assert read_documents(str(path), 1, "paragraph") == ["Lily was happy."]
    assert read_documents(str(path), rule="paragraph") == read_documents(str(path), 10, "paragraph")  # no limit


def test_documents_default_to_training_rule(tmp_path):
    """Unmarked text is one document (stories stay whole); <|endoftext|> lines separate."""
    path = tmp_path / "t.txt"
    path.write_text("Lily was happy.\n\nShe played.\n\n", encoding="utf-8")
    assert read_documents(str(path)) == ["Lily was happy.\n\nShe played."]
    path.write_text("Lily was happy.\n\nShe played.\n<|endoftext|>\nTom was sad.\n", encoding="utf-8")
    assert read_documents(str(path)) == ["Lily was happy.\n\nShe played.", "Tom was sad."]


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


# ---- plain-text help and the rows texts are cut into --------------------------------------


def test_plain_text_renders_rst_markup():
    doc = ("``bilinear-lens eigen``: see :mod:`bilinear_lens.weights.eigen`, :func:`~pkg.mod.name`,\n"
           ":py:class:`title <pkg.Klass>` and `interpreted`; ``--sae\n--feature`` spans lines. Example::\n\n"
           "    bilinear-lens eigen --token \" happy\"\n")
    assert plain_text(doc) == (
        "bilinear-lens eigen: see bilinear_lens.weights.eigen, name,\n"
        "title and interpreted; --sae\n--feature spans lines. Example:\n\n"
        "    bilinear-lens eigen --token \" happy\"")


@pytest.mark.parametrize("command", ["ablate", "eigen", "polytope", "report"])
def test_analysis_help_is_plain_text(command, capsys):
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"bilinear_lens.commands.{command}").main(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and f"bilinear-lens {command}:" in text
    assert "``" not in text and not re.search(r":[a-z]+:`", text), text


class _Tokenizer:
    """Whitespace tokenizer with BOS id 0: enough to check the stream rule."""

    def __init__(self, bos=0):
        self.bos_token_id = bos

    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return [len(word) for word in text.split()]


def test_document_stream_is_every_token_with_a_bos_per_document():
    assert document_stream(_Tokenizer(), ["a bb ccc", "dddd"]) == [0, 1, 2, 3, 0, 4]
    assert document_stream(_Tokenizer(bos=None), ["a bb", "ccc"]) == [1, 2, 3]


@pytest.mark.parametrize("n, length", [(12, 4), (13, 4), (15, 4), (4, 4), (5, 2)])
def test_stream_rows_cover_the_whole_stream_unpadded(n, length):
    stream = list(range(100, 100 + n))
    rows, overlap = stream_rows(stream, length)
    n_rows = -(-n // length)
    assert rows.shape == (n_rows, length) and overlap == n_rows * length - n
    assert rows.flatten()[: (n_rows - 1) * length].tolist() == stream[: (n_rows - 1) * length]
    assert rows[-1].tolist() == stream[-length:]  # the last row ends the stream: nothing dropped or padded
    assert sorted(set(rows.flatten().tolist())) == stream


def test_a_stream_shorter_than_a_row_names_the_flag():
    with pytest.raises(UsageError, match="the texts hold 3 tokens, fewer than one row of --seq-len 4"):
        stream_rows([1, 2, 3], 4)


def test_count_checks_name_the_flag_and_value():
    from types import SimpleNamespace

    args = SimpleNamespace(max_tokens=5, batch_size=0, top=None, examples=-1, n_texts=0)
    require_positive(args, "max_tokens", "top")  # None: not given, passes
    with pytest.raises(UsageError, match=r"^--batch-size must be >= 1, got 0$"):
        require_positive(args, "max_tokens", "batch_size", "n_texts")
    with pytest.raises(UsageError, match=r"^--examples must be >= 0, got -1$"):
        require_non_negative(args, "examples")
    require_non_negative(SimpleNamespace(examples=0), "examples")
