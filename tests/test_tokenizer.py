"""Tokenizers: padding, masks, EOS, truncation warnings, file errors; offline tiny vocabularies."""

import os

import numpy as np
import pytest
from text_testing import SENTENCES, train_sentencepiece, write_word_tokenizer

from vdit.models.tokenizers import (
    ByteTokenizer,
    JsonTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    load_tokenizer,
    prompt_clean,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"json": write_word_tokenizer(str(root / "json")),
            "spm": train_sentencepiece(str(root / "spm"))}


def _check_layout(ids, mask, eos, pad):
    """Right padding: mask is 1 then 0; the last real token is EOS; pads are `pad`."""
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert np.all(m[:n] == 1) and np.all(m[n:] == 0)
        assert row[n - 1] == eos and np.all(row[n:] == pad)


def test_byte_round_trip_and_padding():
    tok = ByteTokenizer(40)
    ids, mask = tok(["a red circle", "", "ünïcode ✓"])
    assert ids.shape == mask.shape == (3, 40) and ids.dtype == np.int32
    _check_layout(ids, mask, tok.eos_id, tok.pad_id)
    assert mask[1].sum() == 1  # an empty prompt keeps its EOS
    assert [tok.decode(r) for r in ids] == ["a red circle", "", "ünïcode ✓"]
    assert ids.max() < tok.vocab_size


def test_byte_truncation_warns_and_keeps_eos():
    tok = ByteTokenizer(8)
    with pytest.warns(UserWarning, match="prompt 0 .* has 12 tokens, more than the 7"):
        ids, mask = tok("a red circle")
    assert mask.sum() == 8 and ids[0, -1] == tok.eos_id
    assert tok.decode(ids[0]) == "a red c"


def test_word_tokenizer_ids_unknowns_and_bad_vocabularies():
    tok = WordTokenizer(["a", "red", "circle", ",", "don't"], 8)
    ids, mask = tok(["A red  circle, don't", "a zebra", ""])
    _check_layout(ids, mask, tok.eos_id, tok.pad_id)
    assert ids[0, :6].tolist() == [3, 4, 5, 6, 7, tok.eos_id] and tok.vocab_size == 8
    assert ids[1, :3].tolist() == [3, tok.unk_id, tok.eos_id]
    assert tok.decode(ids[0]) == "a red circle , don't" and tok.decode(ids[1]) == "a <unk>"
    with pytest.warns(UserWarning, match="prompt 0 .* has 9 tokens, more than the 7"):
        tok(["a " * 9])
    with pytest.raises(ValueError, match="'red circle' is not one lowercase word"):
        WordTokenizer(["a", "red circle"], 8)
    with pytest.raises(ValueError, match=r"duplicate entries: \['a'\]"):
        WordTokenizer(["a", "b", "a"], 8)
    assert tok.fingerprint() != WordTokenizer(["a", "red"], 8).fingerprint()


def test_sentencepiece_round_trip_and_truncation(files):
    tok = SentencePieceTokenizer(files["spm"], 32)
    ids, mask = tok(SENTENCES)
    _check_layout(ids, mask, tok.eos_id, tok.pad_id)
    assert [tok.decode(r) for r in ids] == SENTENCES
    short = SentencePieceTokenizer(files["spm"], 4)
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = short(SENTENCES[:1])
    assert mask.sum() == 4 and ids[0, -1] == short.eos_id


def test_json_tokenizer_matches_transformers(files):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=files["json"], pad_token="<pad>",
                                  eos_token="</s>", unk_token="<unk>")
    texts = ["", "a red circle moving right", "zebra crossing", " ".join(SENTENCES)]
    tok = JsonTokenizer(files["json"], 10)
    with pytest.warns(UserWarning, match="prompt 3 .* max_length=10 tokens; truncated"):
        ids, mask = tok(texts)
    want = ref(texts, padding="max_length", max_length=10, truncation=True,
               add_special_tokens=True, return_attention_mask=True)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    _check_layout(ids, mask, eos=1, pad=0)
    assert tok.decode(ids[1]) == "a red circle moving right"


def test_load_tokenizer_finds_files_and_names_missing_ones(files, tmp_path):
    assert isinstance(load_tokenizer(os.path.dirname(files["json"]), 16), JsonTokenizer)
    assert isinstance(load_tokenizer(os.path.dirname(files["spm"]), 16), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(files["spm"], 16), SentencePieceTokenizer)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
        load_tokenizer(str(tmp_path), 16)
    missing = str(tmp_path / "spiece.model")
    with pytest.raises(FileNotFoundError, match=f"tokenizer path {missing!r} does not exist"):
        load_tokenizer(missing, 16)
    with pytest.raises(FileNotFoundError, match="tokenizer file .*nope.json"):
        JsonTokenizer(str(tmp_path / "nope.json"), 16)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer file .*broken.json' cannot be read"):
        JsonTokenizer(str(tmp_path / "broken.json"), 16)
    with pytest.raises(ValueError, match="max_length=0"):
        ByteTokenizer(0)
    with pytest.raises(ValueError, match="no pad token '<blank>'"):
        JsonTokenizer(files["json"], 16, pad_token="<blank>")
    with pytest.raises(TypeError, match="must be strings, got int"):
        ByteTokenizer(4)(["ok", 3])


def test_fingerprints_differ_by_vocab_and_length(files):
    prints = {ByteTokenizer(8).fingerprint(), ByteTokenizer(9).fingerprint(),
              JsonTokenizer(files["json"], 8).fingerprint(),
              SentencePieceTokenizer(files["spm"], 8).fingerprint()}
    assert len(prints) == 4


def test_prompt_clean_as_wan():
    assert prompt_clean("  a  red&amp;amp;blue \n\t circle ") == "a red&blue circle"
    assert prompt_clean("") == ""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as wan_prompt_clean

    rng = np.random.default_rng(0)
    alphabet = list("ab &;#<>/\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0") + [
        "\u2003", "\u3000", "\u200b", "&amp;", "&lt;", "&#32;", "\U0001f642"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 24)))
        assert prompt_clean(text) == wan_prompt_clean(text), repr(text)
