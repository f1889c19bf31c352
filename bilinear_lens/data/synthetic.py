"""A built-in, seeded corpus of short stories that read like TinyStories.

The stories use a few hundred words of child vocabulary (names, animals, objects, food,
places, weather, feelings) and are built so that **sentiment and negation circuits are
needed to predict them**: every story has an event with a valence (good or bad for the
main character), and the reaction that follows states a feeling that is consistent with
both the event and an optional negation::

    Lily found a shiny ball in the park. She was happy.     (good event)
    Lily found a shiny ball in the park. She was not sad.   (good event, negated)
    Tom lost his red kite.               He was not happy.  (bad event, negated)

Preferences add a second, longer-range dependency: ``"Lily liked the sun. She did not like
the rain."`` followed later by ``"One day, it started to rain."`` and a reaction whose
sentiment is only predictable by remembering which weather was *not* liked.

Generation is plain Python on ``random.Random(seed)``: deterministic for a seed, with the
first ``n`` stories of a longer run equal to ``synthetic_stories(n, seed)``, and fast
(about 100k stories, ~8M characters, in a couple of seconds).

The word lists used to build the stories are exported, and :func:`word_class` labels
every word the generator can emit (``"positive"``, ``"negative"``, ``"negation"``,
``"name"``, ``"animal"``, ...), for use as token labels in later analysis.
"""

from __future__ import annotations

import random
import re
from itertools import islice
from typing import Iterator

__all__ = [
    "GIRL_NAMES",
    "BOY_NAMES",
    "NAMES",
    "ANIMALS",
    "OBJECTS",
    "FOODS",
    "PLACES",
    "WEATHER",
    "DESCRIPTORS",
    "POSITIVE_FEELINGS",
    "NEGATIVE_FEELINGS",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
    "NEGATIONS",
    "PEOPLE",
    "VERBS",
    "OTHER_NOUNS",
    "FUNCTION_WORDS",
    "WORD_CLASSES",
    "word_class",
    "iter_synthetic_stories",
    "synthetic_stories",
]

# --- vocabulary -------------------------------------------------------------------------

GIRL_NAMES: tuple[str, ...] = (
    "Lily", "Sue", "Mia", "Anna", "Lucy", "Emma", "Sara", "Amy", "Zoe", "Kim",
    "Mary", "Jane", "Ella", "Molly", "Ruby",
)
BOY_NAMES: tuple[str, ...] = (
    "Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Bob", "Joe", "Jim",
    "Dan", "Finn", "Luke", "Mark", "Jake",
)
NAMES: tuple[str, ...] = GIRL_NAMES + BOY_NAMES

ANIMALS: tuple[str, ...] = (
    "dog", "cat", "bird", "bunny", "bear", "duck", "frog", "fox", "mouse", "pig",
    "cow", "horse", "lion", "fish", "owl", "puppy", "kitten", "sheep", "goat", "turtle",
)
OBJECTS: tuple[str, ...] = (
    "ball", "kite", "doll", "car", "truck", "book", "hat", "box", "boat", "drum",
    "train", "balloon", "teddy", "block", "crayon", "cup", "shoe", "flower", "stick",
    "rock", "shell", "bike", "toy", "robot", "blanket", "key", "coat", "bag", "star",
)
FOODS: tuple[str, ...] = (
    "cake", "apple", "cookie", "candy", "pie", "soup", "bread", "banana", "pizza",
    "juice", "milk", "carrot", "sandwich", "ice cream",
)
PLACES: tuple[str, ...] = (
    "park", "garden", "forest", "beach", "house", "school", "farm", "lake", "river",
    "hill", "yard", "store", "zoo", "pond", "room", "kitchen", "town", "field",
)
WEATHER: tuple[str, ...] = ("sun", "rain", "snow", "wind")
DESCRIPTORS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "pink", "purple", "big", "little", "small",
    "shiny", "soft", "round", "new", "tall", "fast",
)
# Feelings are the words the reaction slot is filled with (the sentiment targets).
POSITIVE_FEELINGS: tuple[str, ...] = ("happy", "glad", "excited", "proud", "cheerful")
NEGATIVE_FEELINGS: tuple[str, ...] = ("sad", "angry", "scared", "upset", "grumpy", "lonely")
# All words with a sentiment valence: the feelings plus the sentiment-bearing verbs and
# adjectives the templates use.
POSITIVE_WORDS: tuple[str, ...] = POSITIVE_FEELINGS + (
    "like", "liked", "loved", "good", "nice", "fun", "kind", "friendly",
    "smiled", "laughed", "hug", "best",
)
NEGATIVE_WORDS: tuple[str, ...] = NEGATIVE_FEELINGS + (
    "bad", "cried", "frowned", "hurt", "lost", "broke", "mean", "dropped", "fell",
)
NEGATIONS: tuple[str, ...] = ("not", "never")
PEOPLE: tuple[str, ...] = ("mom", "dad", "friend", "girl", "boy", "grandma", "teacher")
VERBS: tuple[str, ...] = (
    "was", "had", "went", "found", "gave", "played", "got", "shared", "saw", "took",
    "ran", "could", "came", "started", "began", "blew", "made", "helped", "find",
    "fixed", "feel", "felt", "did", "named", "chased", "go", "sang", "baked", "walked",
    "shone",
)
OTHER_NOUNS: tuple[str, ...] = (
    "knee", "birthday", "day", "song", "time", "sky", "end", "home", "ground",
)
FUNCTION_WORDS: tuple[str, ...] = (
    "a", "the", "and", "then", "to", "in", "on", "with", "for", "all", "very",
    "again", "anymore", "one", "once", "upon", "there", "she", "he", "her", "his", "him",
    "they", "it", "down", "away", "together", "until", "s",
)

_CONTENT_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("positive", POSITIVE_WORDS),
    ("negative", NEGATIVE_WORDS),
    ("negation", NEGATIONS),
    ("name", NAMES),
    ("animal", ANIMALS),
    ("object", OBJECTS),
    ("food", FOODS),
    ("place", PLACES),
    ("weather", WEATHER),
    ("descriptor", DESCRIPTORS),
    ("person", PEOPLE),
    ("noun", OTHER_NOUNS),
)


def _build_word_classes() -> dict[str, str]:
    """Lower-cased word -> class. Content classes win over verb/function for shared words
    (``"rain"`` is weather, ``"new"`` a descriptor)."""
    classes: dict[str, str] = {}
    for label, words in (("function", FUNCTION_WORDS), ("verb", VERBS)):
        for phrase in words:
            for word in phrase.split():
                classes[word.lower()] = label
    for label, words in _CONTENT_CLASSES:
        for phrase in words:  # multi-word entries ("ice cream") label each word
            for word in phrase.split():
                classes[word.lower()] = label
    return classes


WORD_CLASSES: dict[str, str] = _build_word_classes()

_STRIP = re.compile(r"^[^\w]+|[^\w]+$")


def word_class(word: str) -> str:
    """Class label of one word of the synthetic vocabulary.

    Case, surrounding punctuation, a leading space (as in byte-level BPE tokens, e.g.
    ``"Ġhappy"`` decoded to ``" happy"``) and a possessive ``'s`` are ignored. Returns one
    of ``"positive"``, ``"negative"``, ``"negation"``, ``"name"``, ``"animal"``,
    ``"object"``, ``"food"``, ``"place"``, ``"weather"``, ``"descriptor"``, ``"person"``,
    ``"noun"``, ``"verb"``, ``"function"``, or ``"other"`` for words the generator never
    emits.
    """
    cleaned = _STRIP.sub("", word.strip()).lower()
    if cleaned.endswith("'s"):
        cleaned = cleaned[:-2]
    return WORD_CLASSES.get(cleaned, "other")


# --- story templates --------------------------------------------------------------------
# Each template is a str.format pattern over the fields of _Cast.fields(); events carry the
# valence (+1 good / -1 bad for the main character) that decides the later reaction.

_GOOD_EVENTS: tuple[str, ...] = (
    "{Name} found a {desc} {obj} in the {place}.",
    "{Poss} mom gave {him} a big {food}.",
    "{Name} played with {friend} all day.",
    "{Name} got a new {obj} for {poss} birthday.",
    "{friend} shared {friend_poss} {food} with {Name}.",
    "{Name} saw a friendly {animal} in the {place}.",
    "{Poss} dad made a {desc} {obj} for {him}.",
    "{Name} and {friend} sang a fun song together.",
    "{friend} was nice to {Name}.",
    "{friend} was kind and gave {Name} a {food}.",
    "{Poss} teacher gave {him} a {desc} star.",
)
_BAD_EVENTS: tuple[str, ...] = (
    "{Name} lost {poss} {desc} {obj} in the {place}.",
    "{Name} fell down and hurt {poss} knee.",
    "{Poss} {obj} broke.",
    "{friend} took {Name}'s {obj} and ran away.",
    "{Name} dropped {poss} {food} on the ground.",
    "A big {animal} chased {Name} in the {place}.",
    "{friend} was mean to {Name}.",
    "{Name} could not find {poss} {obj}.",
)
# Fixes for bad events: something good happens, then the reaction is positive again.
_RESOLUTIONS: tuple[str, ...] = (
    "Then {Poss_lower} mom came and gave {him} a hug.",
    "Then {friend} helped {him} and they found a new {obj}.",
    "Then {Poss_lower} dad fixed it for {him}.",
    "Then {friend} gave {him} a {food}.",
    "Then {Poss_lower} grandma baked a {food} for {him}.",
)
_SIZES: tuple[str, ...] = ("little", "small", "big", "fast")
_WEATHER_EVENTS: dict[str, str] = {
    "sun": "One day, the sun shone in the sky.",
    "rain": "One day, it started to rain.",
    "snow": "One day, it began to snow.",
    "wind": "One day, the wind blew and blew.",
}
_ENDINGS_GOOD: tuple[str, ...] = (
    "{Name} smiled and laughed.",
    "They played together until it was time to go home.",
    "It was the best day.",
    "It was a good day.",
    "{Name} gave {friend} a big hug.",
    "{Name} was never sad again.",
    "The end.",
)
_ENDINGS_BAD: tuple[str, ...] = (
    "{Name} cried and went home.",
    "{Name} frowned and walked home.",
    "It was a bad day.",
    "The end.",
)


def _reaction(rng: random.Random, subject: str, pronoun: str, valence: int, after_fix: bool) -> str:
    """One sentence stating a feeling consistent with ``valence`` and an optional negation.

    ``valence`` +1: a positive feeling, or ``not`` + a negative one; -1 the reverse. So the
    feeling word is predictable only from the event *and* the negation before it.
    """
    negated = rng.random() < 0.4
    good = (valence > 0) != negated
    feeling = rng.choice(POSITIVE_FEELINGS if good else NEGATIVE_FEELINGS)
    who = subject if rng.random() < 0.5 else pronoun
    if negated:
        if after_fix:  # a fixed problem: "was not sad anymore"
            return f"{who} was not {feeling} anymore."
        if rng.random() < 0.7:
            return f"{who} was not {feeling}."
        return f"{who} did not feel {feeling}."
    if after_fix:
        return f"{who} was {feeling} again."
    form = rng.random()
    if form < 0.35:
        return f"{who} was very {feeling}."
    if form < 0.8:
        return f"{who} was {feeling}."
    return f"{who} felt {feeling}."


def _story(rng: random.Random) -> str:
    """One story of 5-10 sentences (see the module docstring for its structure)."""
    choice = rng.choice
    random_ = rng.random
    girl = random_() < 0.5
    name = choice(GIRL_NAMES if girl else BOY_NAMES)
    subj, obj_pron, poss = ("She", "her", "her") if girl else ("He", "him", "his")
    friend = choice(NAMES)
    while friend == name:
        friend = choice(NAMES)
    friend_poss = "her" if friend in GIRL_NAMES else "his"
    fields = {
        "Name": name, "him": obj_pron, "poss": poss, "Poss": f"{name}'s",
        "Poss_lower": poss, "friend": friend, "friend_poss": friend_poss,
        "obj": choice(OBJECTS), "desc": choice(DESCRIPTORS), "food": choice(FOODS),
        "place": choice(PLACES), "animal": choice(ANIMALS),
    }
    out: list[str] = []
    pet = choice(ANIMALS) if random_() < 0.4 else None

    # Intro: the main character is a child or an animal with a name.
    if random_() < 0.3:
        kind = choice(ANIMALS)
        out.append(f"Once upon a time, there was a {choice(_SIZES)} {kind} named {name}.")
    else:
        kind = "girl" if girl else "boy"
        out.append(f"Once upon a time, there was a little {kind} named {name}.")
    if pet is not None:
        out.append(f"{subj} had a {pet}.")
    elif random_() < 0.2:
        out.append(f"{subj} had a friend named {friend}.")

    # Event: either preference-driven (weather liked / not liked) or a plain good/bad event.
    if random_() < 0.35:
        liked, disliked = rng.sample(WEATHER, 2)
        verb = "liked" if random_() < 0.7 else "loved"
        out.append(f"{name} {verb} the {liked}. {subj} did not like the {disliked}.")
        if random_() < 0.5:
            out.append(f"{subj} went to the {fields['place']} with {friend}.")
        weather = liked if random_() < 0.5 else disliked
        out.append(_WEATHER_EVENTS[weather])
        valence = 1 if weather == liked else -1
    else:
        if random_() < 0.6:
            where = f"One day, {name} went to the {fields['place']}"
            out.append(f"{where} with {poss} {pet}." if pet is not None else f"{where}.")
        valence = 1 if random_() < 0.5 else -1
        out.append(choice(_GOOD_EVENTS if valence > 0 else _BAD_EVENTS).format(**fields))

    out.append(_reaction(rng, name, subj, valence, after_fix=False))
    if pet is not None and random_() < 0.5:  # the pet shares the feeling
        out.append(_reaction(rng, f"The {pet}", "It", valence, after_fix=False))

    if valence < 0 and random_() < 0.6:
        out.append(choice(_RESOLUTIONS).format(**fields))
        out.append(_reaction(rng, name, subj, 1, after_fix=True))
        valence = 1
    out.append(choice(_ENDINGS_GOOD if valence > 0 else _ENDINGS_BAD).format(**fields))
    return " ".join(out)


def iter_synthetic_stories(seed: int | str = 0) -> Iterator[str]:
    """Endless stream of synthetic stories from ``random.Random(seed)``.

    Deterministic: the same seed yields the same sequence, and a prefix of it does not
    depend on how many stories are drawn later.
    """
    rng = random.Random(seed)
    while True:
        yield _story(rng)


def synthetic_stories(n: int, seed: int | str = 0) -> list[str]:
    """The first ``n`` stories of :func:`iter_synthetic_stories` for ``seed`` (list of ``n`` str)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(islice(iter_synthetic_stories(seed), n))
