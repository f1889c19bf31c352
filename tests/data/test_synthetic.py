"""The synthetic story corpus: determinism, the sentiment/negation constructs, word labels."""

from __future__ import annotations

import re

import pytest

from bilinear_lens.data.synthetic import (
    NEGATIONS,
    NEGATIVE_FEELINGS,
    NEGATIVE_WORDS,
    POSITIVE_FEELINGS,
    POSITIVE_WORDS,
    WEATHER,
    WORD_CLASSES,
    iter_synthetic_stories,
    synthetic_stories,
    word_class,
)

N_STORIES = 3000


@pytest.fixture(scope="module")
def stories() -> list[str]:
    return synthetic_stories(N_STORIES, seed=0)


def test_same_seed_same_stories_different_seed_different() -> None:
    assert synthetic_stories(200, seed=1) == synthetic_stories(200, seed=1)
    assert synthetic_stories(200, seed=1) != synthetic_stories(200, seed=2)
    # a prefix does not depend on how many stories are drawn
    assert synthetic_stories(50, seed=3) == synthetic_stories(400, seed=3)[:50]
    gen = iter_synthetic_stories(3)
    assert [next(gen) for _ in range(5)] == synthetic_stories(5, seed=3)


def test_rejects_negative_count() -> None:
    with pytest.raises(ValueError, match="n must be >= 0"):
        synthetic_stories(-1)


def test_stories_are_short_and_varied(stories: list[str]) -> None:
    sentences = [s.count(".") for s in stories]
    assert min(sentences) >= 3 and max(sentences) <= 12
    assert len(set(stories)) > 0.9 * len(stories)
    words = {w.lower() for s in stories for w in re.findall(r"[A-Za-z]+", s)}
    assert 150 <= len(words) <= 600  # a few hundred words of child vocabulary


def test_contains_sentiment_and_negation_constructs(stories: list[str]) -> None:
    text = "\n".join(stories)
    for pattern in [
        r"\b[A-Z][a-z]+ was happy\.",
        r"\b(?:She|He|[A-Z][a-z]+) was not happy\.",
        r"\bThe [a-z]+ was not sad\.",
        r"\b(?:she|he|She|He) did not like the (?:rain|snow|sun|wind)\.",
        r"\bwas very happy\.",
        r"\bdid not feel sad\.",
        r"\bwas not sad anymore\.",
        r"\bwas never sad again\.",
    ]:
        assert re.search(pattern, text), pattern


_REACTION = re.compile(
    r"(?:^|\. )(?:[A-Z][a-z]+|The [a-z]+) (was not|did not feel|was very|was|felt) (\w+)(?: again| anymore)?\."
)


def _net_sentiment(verb: str, feeling: str) -> int:
    """+1 if the reaction states a good state ("was happy", "was not sad"), else -1."""
    polarity = 1 if feeling in POSITIVE_FEELINGS else -1
    assert feeling in POSITIVE_FEELINGS + NEGATIVE_FEELINGS, feeling
    return -polarity if verb.startswith(("was not", "did not")) else polarity


def test_reaction_follows_liked_or_disliked_weather(stories: list[str]) -> None:
    """The feeling after a weather event is predictable only from the stated preference
    ("did not like the rain") and the negation in the reaction ("was not happy")."""
    weather_event = {"sun": "the sun shone", "rain": "started to rain", "snow": "began to snow", "wind": "the wind blew"}
    checked = 0
    for story in stories:
        pref = re.search(r"(?:liked|loved) the (\w+)\. (?:She|He) did not like the (\w+)\.", story)
        if pref is None:
            continue
        liked, disliked = pref.groups()
        assert liked in WEATHER and disliked in WEATHER and liked != disliked
        happened = [w for w, phrase in weather_event.items() if phrase in story]
        assert len(happened) == 1 and happened[0] in (liked, disliked), story
        after_event = story[story.index(weather_event[happened[0]]) :]
        first = _REACTION.search(after_event)
        assert first is not None, story
        expected = 1 if happened[0] == liked else -1
        assert _net_sentiment(*first.groups()) == expected, story
        checked += 1
    assert checked > 0.2 * len(stories)


def test_negation_flips_the_feeling_word(stories: list[str]) -> None:
    """Both polarities occur with and without negation, so the feeling word is not
    predictable from the event alone."""
    seen = set()
    for story in stories:
        for verb, feeling in _REACTION.findall(" " + story):
            seen.add((verb.startswith(("was not", "did not")), feeling in POSITIVE_FEELINGS))
    assert seen == {(False, True), (False, False), (True, True), (True, False)}


def test_every_generated_word_has_a_class(stories: list[str]) -> None:
    words = {w for s in stories for w in re.findall(r"[A-Za-z]+", s)}
    unlabeled = sorted(w for w in words if word_class(w) == "other")
    assert unlabeled == []


def test_word_class_labels() -> None:
    assert word_class("happy") == "positive"
    assert word_class(" Happy.") == "positive"  # BPE-decoded tokens carry a leading space
    assert word_class("sad") == "negative"
    assert word_class("not") == "negation"
    assert word_class("Lily's") == "name"
    assert word_class("dog") == "animal"
    assert word_class("ball") == "object"
    assert word_class("park") == "place"
    assert word_class("rain") == "weather"
    assert word_class("the") == "function"
    assert word_class("xylophone") == "other"
    assert set(POSITIVE_WORDS).isdisjoint(NEGATIVE_WORDS)
    assert all(word_class(w) == "negation" for w in NEGATIONS)
    assert set(WORD_CLASSES.values()) >= {"positive", "negative", "negation", "name", "animal", "object", "function"}
