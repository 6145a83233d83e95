"""Prompt expansion: shapes-world rules produce training-style captions; the LM hook is checked."""

import numpy as np
import pytest

from vdit.data import shapes_captions
from vdit.pipelines import prompt_expand as pe


def test_shapes_terse_prompts_become_canonical_captions():
    expand = pe.shapes_expander()
    assert expand("red circle right") == "a red circle moving right"
    assert expand("  Blue BOX, heading leftward ") == "a blue square moving left"
    assert expand("green triangle static and purple ball up") == (
        "a static green triangle and a purple circle moving up")
    objects = [{"color": "cyan", "shape": "square", "direction": "down"}]
    assert expand("cyan square down") == shapes_captions.build_caption(objects, 0)


def test_varied_wording_keeps_the_content():
    rng = np.random.default_rng(0)
    captions = {pe.shapes_expander(template=None, split=split)("yellow disc to the left", rng)
                for _ in range(20) for split in ("train", "heldout")}
    expand = pe.shapes_expander()
    assert len(captions) > 3
    for caption in captions:
        assert expand.parse(caption) == [
            {"color": "yellow", "shape": "circle", "direction": "left"}], caption


def test_incomplete_prompts_are_left_alone():
    expand = pe.shapes_expander()
    assert expand("a  red circle") == "a red circle"  # no direction: nothing is guessed
    assert expand("two shapes bounce") == "two shapes bounce"
    assert expand("") == ""


def test_generic_slots_and_template_errors():
    vocab = {"animal": {"cat": "cat", "kitten": "cat"}, "act": {"jumps": "jumping"}}
    render = lambda objects, rng=None: " and ".join("a {animal} {act}".format(**o) for o in objects)
    expand = pe.SlotExpander(vocab, render)
    assert expand("kitten jumps") == "a cat jumping"
    assert expand("kitten jumps and cat jumps") == "a cat jumping and a cat jumping"
    with pytest.raises(ValueError, match="template=99"):
        pe.shapes_expander(template=99)
    with pytest.raises(TypeError, match="prompt must be a string"):
        pe.shapes_expander()(3)
