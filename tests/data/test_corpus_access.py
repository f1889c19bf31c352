"""Corpus access fails fast and says how to fix it: a missing local corpus names the
override, an unreachable hub is one line (no ~30 s retry loop), offline mode without a
cached copy is one line."""

import errno
import socket
import time

import pytest

from bilinear_lens.data.corpus import CorpusUnavailableError, iter_texts, load_texts


def test_missing_local_corpus_names_the_override(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"corpus file not found: .*nope\.txt \(data\.source\); give the corpus "
                       r"path with --set data\.source=path/to/stories\.txt"):
        load_texts(tmp_path / "nope.txt")


def test_unreachable_hub_fails_in_one_line_without_retries(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def unreachable(address, timeout=None, *args, **kwargs):
        calls.append((address, timeout))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(CorpusUnavailableError) as err:
        list(iter_texts("roneneldan/TinyStories"))
    assert time.perf_counter() - start < 2.0  # the probe, not datasets' retry loop
    message = str(err.value)
    assert "\n" not in message and len(calls) == 1
    assert message.startswith("cannot reach the Hugging Face hub (huggingface.co:443: Network is unreachable) "
                              "to load dataset 'roneneldan/TinyStories' (data.source)")
    assert "--set data.source=path/to/stories.txt" in message and isinstance(err.value, ValueError)


def test_offline_mode_without_a_cached_copy_is_one_line(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("offline mode must not probe"))
    with pytest.raises(CorpusUnavailableError, match=r"^dataset 'nobody/no-such-dataset' \(data\.source\) is not in "
                       r"the cache and offline mode is on \(.*\); train on a local file instead: --set data\.source="):
        list(iter_texts("nobody/no-such-dataset", hf_cache_dir=str(tmp_path)))
