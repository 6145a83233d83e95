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


def test_generic_template_and_callable_hook():
    vocab = {"animal": {"cat": "cat", "kitten": "cat"}, "act": {"jumps": "jumping"}}
    expand = pe.SlotExpander(vocab, pe.template_render("a {animal} {act}"))
    assert expand("kitten jumps") == "a cat jumping"
    seen = []
    hook = pe.CallableExpander(lambda s: seen.append(s) or "A long  caption.",
                               instruction="Describe: {prompt}")
    assert hook(" red  circle ") == "A long caption." and seen == ["Describe: red circle"]
    with pytest.raises(ValueError, match="returned None .* expected a non-empty string"):
        pe.CallableExpander(lambda s: None)("x")


def test_config_selection_and_errors():
    assert pe.expander_from_config(None)("  a  b ") == "a b"
    assert pe.expander_from_config({"kind": "shapes"})("red dot up") == "a red circle moving up"
    hook = pe.expander_from_config({"kind": "callable", "fn": "builtins:str"})
    assert hook("red circle") == "red circle"
    with pytest.raises(ValueError, match="kind='llm'"):
        pe.expander_from_config({"kind": "llm"})
    with pytest.raises(ValueError, match="fn='nocolon'"):
        pe.expander_from_config({"kind": "callable", "fn": "nocolon"})
    with pytest.raises(ValueError, match="'nothing' is not a callable in 'builtins'"):
        pe.expander_from_config({"kind": "callable", "fn": "builtins:nothing"})
    with pytest.raises(ValueError, match="template=99"):
        pe.shapes_expander(template=99)
    with pytest.raises(TypeError, match="prompt must be a string"):
        pe.shapes_expander()(3)
