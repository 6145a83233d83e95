"""Caption wording for the synthetic shapes world: templates, synonyms, train/held-out split.

A caption is built from ground truth (`objects`: dicts with `shape`, `color`, `direction`, main
object first) and a template. Template 0 with no rng gives the canonical wording, e.g.
"a red circle moving right" / "a static red circle". With an rng, synonyms vary
("a red circle rolls to the right", "red square drifting upward"); each shape has one word
(SHAPE_WORDS), and a prompt's other words for it (SHAPE_ALIASES) are the prompt expander's job.

Templates are split into `TRAIN_TEMPLATES` and `HELDOUT_TEMPLATES`: the held-out ones use sentence
structures never produced by the training ones, to test generalisation to unseen wordings. Every
synonym (verbs, directions, still phrases) also occurs in some training template:
a word-level text encoder cannot know the meaning of a word it never saw ("not moving"), so the
held-out split varies the structure, not the lexicon; only its frame words ("there is", "clip of",
"one", "that", ",") are new.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from vdit.models.tokenizers import split_words

# One word per shape: the demo's word-level text encoder is frozen at random features, so a
# synonym shares nothing with its shape's other words and must be learned from its own examples
# (with 4 / 3 circle / square words a 1600-step demo DiT drew circles as squares). Users' synonyms
# reach these words through the prompt expander (SHAPE_ALIASES, vdit/pipelines/prompt_expand.py).
SHAPE_WORDS = {
    "circle": ("circle",),
    "square": ("square",),
    "triangle": ("triangle",),
}
# Words a prompt may use for a shape that captions never contain (the expander maps them).
SHAPE_ALIASES = {
    "circle": ("ball", "disc", "dot"),
    "square": ("box", "block"),
    "triangle": (),
}
DIRECTION_WORDS = {
    "right": ("right", "to the right", "rightward"),
    "left": ("left", "to the left", "leftward"),
    "up": ("up", "upward", "toward the top"),
    "down": ("down", "downward", "toward the bottom"),
}
VERBS_ING = ("moving", "drifting", "sliding", "gliding", "heading", "travelling")
VERBS_S = ("moves", "drifts", "slides", "glides", "heads", "travels")
# Only round things roll.
ROLL_ING, ROLL_S = "rolling", "rolls"
STILL_ADJ = ("static", "stationary", "motionless")
STILL_ING = ("standing still", "staying in place", "not moving")
STILL_S = ("stays still", "does not move", "stays in place")


class Template(NamedTuple):
    """`frame` wraps the joined object clauses ({objects}); `moving`/`still` word one object.

    Clause fields: {color} {shape} {ing} {s} {dir} {adj} {still_ing} {still_s}.
    """

    frame: str
    moving: str
    still: str


TEMPLATES: tuple[Template, ...] = (
    Template("{objects}", "a {color} {shape} {ing} {dir}", "a {adj} {color} {shape}"),
    Template("{objects}", "{color} {shape} {ing} {dir}", "{color} {shape} {still_ing}"),
    Template("{objects}", "a {color} {shape} {s} {dir}", "a {color} {shape} {still_s}"),
    Template("the video shows {objects}", "a {color} {shape} {ing} {dir}",
             "a {adj} {color} {shape}"),
    Template("{objects}", "the {color} {shape} is {ing} {dir}", "the {color} {shape} is {adj}"),
    Template("{objects}", "a {shape} in {color} {ing} {dir}", "a {adj} {shape} in {color}"),
    # Held-out wordings (see HELDOUT_TEMPLATES).
    Template("there is {objects}", "a {color} {shape} that {s} {dir}",
             "a {color} {shape} that {still_s}"),
    Template("{objects}", "a {color} {shape}, {ing} {dir}", "a {color} {shape}, {still_ing}"),
    Template("clip of {objects}", "one {color} {shape} {ing} {dir}", "one {adj} {color} {shape}"),
)
TRAIN_TEMPLATES: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
HELDOUT_TEMPLATES: tuple[int, ...] = (6, 7, 8)
CAPTION_SPLITS = ("train", "heldout", "all")


def template_ids(split: str) -> tuple[int, ...]:
    """Template indices for a caption split: "train", "heldout" or "all"."""
    if split == "train":
        return TRAIN_TEMPLATES
    if split == "heldout":
        return HELDOUT_TEMPLATES
    if split == "all":
        return tuple(range(len(TEMPLATES)))
    raise ValueError(f"caption split must be one of {CAPTION_SPLITS}, got {split!r}")


def _pick(options: Sequence[str], rng: np.random.Generator | None) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _clause(template: Template, obj: dict, rng: np.random.Generator | None) -> str:
    shape, color, direction = obj["shape"], obj["color"], obj["direction"]
    if shape not in SHAPE_WORDS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {tuple(SHAPE_WORDS)}")
    words = {"color": color, "shape": _pick(SHAPE_WORDS[shape], rng)}
    if direction == "still":
        words.update(adj=_pick(STILL_ADJ, rng), still_ing=_pick(STILL_ING, rng),
                     still_s=_pick(STILL_S, rng))
        return template.still.format(**words)
    if direction not in DIRECTION_WORDS:
        raise ValueError(
            f"unknown direction {direction!r}; expected one of {(*DIRECTION_WORDS, 'still')}")
    ing, s = list(VERBS_ING), list(VERBS_S)
    if shape == "circle":
        ing.append(ROLL_ING)
        s.append(ROLL_S)
    words.update(ing=_pick(ing, rng), s=_pick(s, rng), dir=_pick(DIRECTION_WORDS[direction], rng))
    return template.moving.format(**words)


def build_caption(objects: Sequence[dict], template: int = 0,
                  rng: np.random.Generator | None = None) -> str:
    """Caption for ground-truth `objects` (main object first) with template index `template`.

    rng=None picks the first synonym everywhere (deterministic canonical wording).
    """
    if not objects:
        raise ValueError("build_caption needs at least one object")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template index {template} out of range [0, {len(TEMPLATES)})")
    tpl = TEMPLATES[template]
    clauses = [_clause(tpl, obj, rng) for obj in objects]
    return tpl.frame.format(objects=" and ".join(clauses))


def vocabulary(colors: Sequence[str]) -> list[str]:
    """Every word and punctuation mark a caption can contain, in first-use order.

    The lexicon of all templates, training and held-out alike: like a real tokenizer's vocabulary
    it covers words the training captions never use (their embeddings simply stay untrained).
    """
    texts = [*colors, "and"]
    for table in (SHAPE_WORDS, DIRECTION_WORDS):
        texts += [w for options in table.values() for w in options]
    texts += [*VERBS_ING, *VERBS_S, ROLL_ING, ROLL_S, *STILL_ADJ, *STILL_ING, *STILL_S]
    texts += [re.sub(r"{\w+}", " ", part) for template in TEMPLATES for part in template]
    words: list[str] = []
    for text in texts:
        words += [w for w in split_words(text) if w not in words]
    return words
