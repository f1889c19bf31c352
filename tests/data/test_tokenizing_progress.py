"""The tokenizing progress counts the source's documents (issue 25 audit: a one-document
``.txt`` read whole showed ``tokenizing: 2 doc``, its train head and val tail)."""

from __future__ import annotations

import pytest

from bilinear_lens.data import corpus
from bilinear_lens.data.synthetic import synthetic_stories
from fixtures.tokenizers import stories_backend


@pytest.fixture
def counted(monkeypatch):
    """Records what each tokenizing progress bar was given to count."""
    seen: list[dict] = []
    real = corpus.progress_bar

    def recording(iterable=None, **kwargs):
        record = {"desc": kwargs.get("desc"), "unit": kwargs.get("unit"), "n": 0}
        seen.append(record)

        def items():
            for item in iterable:
                record["n"] += 1
                yield item

        return real(items(), **kwargs)

    monkeypatch.setattr(corpus, "progress_bar", recording)
    return seen


@pytest.mark.parametrize("whole_file, texts, n_docs", [
    (True, ["\n\n".join(synthetic_stories(20, seed=1))], 1),  # one document: head to train, tail to val
    (False, synthetic_stories(30, seed=2), 30),
])
def test_tokenizing_counts_source_documents_not_split_pieces(tmp_path, counted, whole_file, texts, n_docs):
    tok = stories_backend(50, 300)  # trained once per session (tests/fixtures)
    paths = corpus.build_token_cache(texts, tok, tmp_path, "k", val_fraction=0.2, seed=0, progress=True,
                                     whole_file=whole_file)
    [bar] = [r for r in counted if r["desc"] == "tokenizing"]
    assert (bar["unit"], bar["n"]) == ("doc", n_docs)
    assert set(paths) >= {"train", "val"}  # both splits written: the whole file did become two pieces


def test_a_whole_file_is_one_document_in_the_sae_text_line(tmp_path):
    """The sidecars count a whole file's head and tail; the SAE's status line counts it once."""
    from types import SimpleNamespace

    from bilinear_lens.data.split_summary import document_count
    from bilinear_lens.sae.recipe import RECIPE_DATA, SAERecipe
    from bilinear_lens.sae.train import sae_text_line

    spec = {"source": str(tmp_path / "stories.txt"), "documents": "file"}
    train, val = SimpleNamespace(meta={"source": spec, "n_docs": 1}), SimpleNamespace(meta={"n_docs": 1})
    recipe = SAERecipe.from_dict({"data": {"source": spec["source"]}}, where="test recipe", data_origin=RECIPE_DATA)
    assert sae_text_line(recipe, train, val).endswith("(recipe data.source, documents: file), 1 document")
    assert document_count({"documents": "endoftext"}, 30, 10) == 40 and document_count(spec, 1, 0) == 1
