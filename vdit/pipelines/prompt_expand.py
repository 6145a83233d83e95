"""Prompt expansion (`vdit sample --expand-prompt`): turn a terse prompt into a caption worded
like the training captions.

`SlotExpander` is rule-based: it finds slot words (e.g. color, shape, direction) in each clause of
the prompt and renders a full caption from them; `shapes_expander()` wires it to the synthetic
shapes world, so "red circle right" becomes "a red circle moving right" (or a varied wording with
an rng). A prompt whose clauses lack a slot is returned cleaned but otherwise unchanged: the rules
never guess content.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np

from vdit.data import shapes_captions as sc
from vdit.data.synthetic import COLORS
from vdit.models.tokenizers import prompt_clean

_CLAUSE_SPLIT = re.compile(r"\s*(?:;|\band\b|\bplus\b)\s*")  # commas stay: "a ball, rolling left"


@dataclasses.dataclass(frozen=True)
class SlotExpander:
    """Rule-based expansion over slots.

    vocab:  slot -> {surface word or phrase: canonical value}; the longest phrase wins.
    render: (objects, rng or None) -> caption, `objects` a list of {slot: canonical value}.
    """

    vocab: Mapping[str, Mapping[str, str]]
    render: Callable[[list[dict], np.random.Generator | None], str]

    def parse(self, prompt: str) -> list[dict] | None:
        """One {slot: value} per clause; None when a clause misses any slot."""
        objects = []
        for clause in _CLAUSE_SPLIT.split(prompt_clean(prompt).lower()):
            if not clause:
                continue
            found = {slot: _find(clause, words) for slot, words in self.vocab.items()}
            if any(value is None for value in found.values()):
                return None
            objects.append(found)
        return objects or None

    def __call__(self, prompt: str, rng: np.random.Generator | None = None) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        objects = self.parse(prompt)
        return prompt_clean(prompt) if objects is None else self.render(objects, rng)


def _find(clause: str, words: Mapping[str, str]) -> str | None:
    """The canonical value of the longest surface phrase in `clause` (earliest on ties)."""
    best = None
    for phrase, value in words.items():
        match = re.search(rf"\b{re.escape(phrase)}\b", clause)
        if match and (best is None or (len(phrase), -match.start()) > best[0]):
            best = ((len(phrase), -match.start()), value)
    return None if best is None else best[1]


def shapes_vocab() -> dict[str, dict[str, str]]:
    """Surface words of the synthetic world (from its caption module) -> canonical values; shape
    aliases the captions never use ("ball", "box") map to the captions' shape words."""
    shape = {w: name for table in (sc.SHAPE_WORDS, sc.SHAPE_ALIASES)
             for name, words in table.items() for w in (name, *words)}
    direction = {w: name for name, words in sc.DIRECTION_WORDS.items() for w in (name, *words)}
    still = ("still", "static", *sc.STILL_ADJ, *sc.STILL_ING, *sc.STILL_S)
    direction |= {w: "still" for w in still}
    return {"color": {c: c for c in COLORS}, "shape": shape, "direction": direction}


def shapes_expander(template: int | None = 0, split: str = "train") -> SlotExpander:
    """Expander for the shapes world with its caption builder.

    template: a fixed template index, or None to draw one from `split`'s templates with the rng
    given per call (no rng: the split's first template, canonical words).
    """
    choices = sc.template_ids(split)
    if template is not None and not 0 <= template < len(sc.TEMPLATES):
        raise ValueError(f"prompt expansion template={template}: expected None or an index "
                         f"in [0, {len(sc.TEMPLATES)})")

    def render(objects, rng=None):
        index = template
        if index is None:
            index = choices[0] if rng is None else int(rng.choice(choices))
        return sc.build_caption(objects, index, rng)

    return SlotExpander(shapes_vocab(), render)
