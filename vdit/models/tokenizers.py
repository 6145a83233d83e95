"""Text tokenizers: bytes or a word list (no files), SentencePiece `spiece.model`, HF `tokenizer.json`.

Each is a callable `tok(texts) -> (ids [B, L] int32, mask [B, L] int32)` with L = `max_length`,
right padding with the pad id, and T5's end-of-sequence token appended (kept when truncating, as
transformers does). A text that does not fit is truncated with a warning, never an error.
`fingerprint()` identifies the vocabulary and length, for caches keyed on it.
"""

from __future__ import annotations

import hashlib
import html
import re
import warnings
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm
from etils import epath
from tokenizers import Tokenizer


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning: ftfy when installed, html-unescape twice, collapse whitespace."""
    try:
        import ftfy  # optional, as in diffusers
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    # Wan's \s is the `regex` package's (Unicode White_Space), which leaves the separators
    # \x1c-\x1f alone where the standard library's \s matches them.
    return re.sub(r"[^\S\x1c-\x1f]+", " ", text).strip()


def _check_max_length(max_length) -> int:
    if int(max_length) < 1:
        raise ValueError(f"tokenizer max_length={max_length!r}: expected >= 1")
    return int(max_length)


def _check_texts(texts) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"tokenizer input must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return texts


def _pack(rows: Sequence[list[int]], max_length: int, pad_id: int, eos_id: int | None,
          texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists (without EOS) -> padded ids and mask; truncates with a warning."""
    room = max_length - (eos_id is not None)
    ids = np.full((len(rows), max_length), pad_id, np.int32)
    mask = np.zeros((len(rows), max_length), np.int32)
    for i, row in enumerate(rows):
        if len(row) > room:
            warnings.warn(f"prompt {i} ({texts[i][:60]!r}...) has {len(row)} tokens, more than "
                          f"the {room} that fit in max_length={max_length}; truncated",
                          stacklevel=3)
            row = row[:room]
        row = list(row) + ([eos_id] if eos_id is not None else [])
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


class ByteTokenizer:
    """UTF-8 bytes shifted past the specials: pad 0, EOS 1, byte b -> b + 2 (vocab 258)."""

    pad_id = 0
    eos_id = 1
    offset = 2
    vocab_size = 258

    def __init__(self, max_length: int):
        self.max_length = _check_max_length(max_length)

    def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
        texts = _check_texts(texts)
        rows = [[b + self.offset for b in t.encode("utf-8")] for t in texts]
        return _pack(rows, self.max_length, self.pad_id, self.eos_id, texts)

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return f"byte:v{self.vocab_size}:L{self.max_length}"


_WORD = re.compile(r"[\w']+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lowercased runs of letters/digits/apostrophes and single punctuation marks."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Whole words from a fixed vocabulary: pad 0, EOS 1, unknown 2, `vocab[i]` -> i + 3.

    Text splits as `split_words` does. A closed-world vocabulary (the synthetic captions' words)
    gives ~6x shorter sequences than bytes, so a small text encoder reads a prompt in a few tokens.
    """

    pad_id = 0
    eos_id = 1
    unk_id = 2
    offset = 3

    def __init__(self, vocab: Sequence[str], max_length: int):
        self.max_length = _check_max_length(max_length)
        vocab = [str(w) for w in vocab]
        bad = [w for w in vocab if split_words(w) != [w]]
        if bad:
            raise ValueError(f"word vocabulary entry {bad[0]!r} is not one lowercase word or "
                             "punctuation mark")
        if len(set(vocab)) != len(vocab):
            dup = sorted({w for w in vocab if vocab.count(w) > 1})
            raise ValueError(f"word vocabulary has duplicate entries: {dup}")
        self.vocab = vocab
        self._ids = {w: i + self.offset for i, w in enumerate(vocab)}
        self.vocab_size = len(vocab) + self.offset

    def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
        texts = _check_texts(texts)
        rows = [[self._ids.get(w, self.unk_id) for w in split_words(t)] for t in texts]
        return _pack(rows, self.max_length, self.pad_id, self.eos_id, texts)

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` outside the vocabulary (each encodes as <unk>), once each, in order."""
        return list(dict.fromkeys(w for w in split_words(text) if w not in self._ids))

    def decode(self, ids) -> str:
        words = {i: w for w, i in self._ids.items()} | {self.unk_id: "<unk>"}
        return " ".join(words[int(i)] for i in ids if int(i) in words)

    def fingerprint(self) -> str:
        digest = hashlib.sha256("\n".join(self.vocab).encode()).hexdigest()[:16]
        return f"word:{digest}:L{self.max_length}"


class SentencePieceTokenizer:
    """A `spiece.model` (T5/UMT5's format) read with the `sentencepiece` package.

    Plain text tokenizes as transformers' T5 tokenizer does; two differences remain, which is why
    a folder's tokenizer.json is preferred: the literal text of a special token ("</s>", "<pad>")
    is split into pieces rather than read as that token, and a byte-fallback model's unknown
    characters become byte pieces where transformers gives <unk>.
    """

    def __init__(self, path: str, max_length: int, add_eos: bool = True):
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"sentencepiece model {path!r} does not exist")
        self.path, self.max_length = path, _check_max_length(max_length)
        self._sp = spm.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes())
        self.vocab_size = self._sp.get_piece_size()
        # T5 models set pad=0, eos=1; a model without a pad piece falls back to id 0.
        self.pad_id = max(self._sp.pad_id(), 0)
        self.eos_id = self._sp.eos_id() if add_eos else None
        if add_eos and self.eos_id < 0:
            raise ValueError(f"sentencepiece model {path!r} has no EOS piece; pass add_eos=False")

    def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
        texts = _check_texts(texts)
        rows = self._sp.encode(texts, out_type=int)
        return _pack(rows, self.max_length, self.pad_id, self.eos_id, texts)

    def decode(self, ids) -> str:
        specials = {self.pad_id, self.eos_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in specials])

    def fingerprint(self) -> str:
        return f"spm:{_file_hash(self.path)}:L{self.max_length}:eos{self.eos_id}"


class JsonTokenizer:
    """A Hugging Face `tokenizer.json` read with the `tokenizers` package.

    Its own post-processor adds the specials (T5's appends `</s>`); padding uses `pad_token`.
    """

    def __init__(self, path: str, max_length: int, pad_token: str = "<pad>"):
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        self.path, self.max_length = path, _check_max_length(max_length)
        try:
            tok = Tokenizer.from_str(epath.Path(path).read_text())
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ValueError(f"tokenizer file {path!r} cannot be read ({type(e).__name__}: {e}); "
                             "is it a Hugging Face tokenizer.json?") from e
        self.pad_id = tok.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"tokenizer {path!r} has no pad token {pad_token!r}")
        tok.enable_truncation(self.max_length)
        tok.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token=pad_token)
        self.vocab_size = tok.get_vocab_size()
        self._tok = tok

    def __call__(self, texts) -> tuple[np.ndarray, np.ndarray]:
        texts = _check_texts(texts)
        encodings = self._tok.encode_batch(texts)
        for i, enc in enumerate(encodings):
            if enc.overflowing:
                warnings.warn(f"prompt {i} ({texts[i][:60]!r}...) does not fit in "
                              f"max_length={self.max_length} tokens; truncated", stacklevel=2)
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), -1)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(len(texts), -1)
        return ids, mask

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        return f"json:{_file_hash(self.path)}:L{self.max_length}:pad{self.pad_id}"


def load_tokenizer(path: str, max_length: int):
    """A tokenizer from a file (`*.json` or `*.model`) or a folder holding `tokenizer.json` or
    `spiece.model` (tokenizer.json preferred, as transformers' fast tokenizer does)."""
    folder = epath.Path(path)
    if folder.is_dir():
        kinds = (("tokenizer.json", JsonTokenizer), ("spiece.model", SentencePieceTokenizer))
        for name, cls in kinds:
            if (folder / name).is_file():
                return cls(str(folder / name), max_length)
        raise FileNotFoundError(f"tokenizer folder {path!r} has neither tokenizer.json nor "
                                f"spiece.model (found: {sorted(p.name for p in folder.iterdir())})")
    if not folder.is_file():
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    if path.endswith(".json"):
        return JsonTokenizer(path, max_length)
    return SentencePieceTokenizer(path, max_length)


def _file_hash(path: str) -> str:
    return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()[:16]
