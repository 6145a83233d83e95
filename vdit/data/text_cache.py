"""Caption embedding cache: encode a caption set once, store it, and refuse a stale one on load.

A cache file (`.npz`, no pickles) holds each distinct caption's embedding rows up to its token
count (`flat [sum(lengths), D]`, `lengths [N]`) and a key: the encoder's config, a hash of its
parameters, the tokenizer's fingerprint and the cleaning flag. `lookup` re-pads with zeros to the
tokenizer length, giving exactly what `encode_prompts` returns. Loading with a different key is an
error that says which part differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from vdit import runs
from vdit.models.text import encode_prompts
from vdit.models.tokenizers import prompt_clean


def params_fingerprint(params) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (reads all weights once)."""
    digest = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def cache_key(module, params, tokenizer, clean: bool = True) -> dict:
    """What a cache's contents depend on; compute once (it hashes the weights) and reuse."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.name not in ("parent", "name")}
    return {
        "encoder": {"class": type(module).__name__} | {k: str(v) for k, v in fields.items()},
        "weights": params_fingerprint(params),
        "tokenizer": tokenizer.fingerprint(),
        "max_length": int(tokenizer.max_length),
        "clean": bool(clean),
    }


@dataclasses.dataclass(frozen=True)
class TextCache:
    """Stored embeddings; `lookup(captions) -> [B, max_length, D]` float32."""

    key: dict
    captions: tuple[str, ...]
    lengths: np.ndarray  # [N] int
    flat: np.ndarray  # [sum(lengths), D]
    path: str = ""

    def __post_init__(self):
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.captions)})
        object.__setattr__(self, "_starts", starts)

    def lookup(self, captions: Sequence[str]) -> np.ndarray:
        captions = [captions] if isinstance(captions, str) else list(captions)
        missing = [c for c in captions if c not in self._index]
        if missing:
            raise KeyError(f"{len(missing)} caption(s) not in text cache {self.path!r}, e.g. "
                           f"{missing[0]!r}; rebuild the cache with them")
        out = np.zeros((len(captions), self.key["max_length"], self.flat.shape[1]), np.float32)
        for row, caption in enumerate(captions):
            i = self._index[caption]
            n = int(self.lengths[i])
            out[row, :n] = self.flat[self._starts[i]:self._starts[i] + n]
        return out


def build_text_cache(path: str, module, params, tokenizer, captions: Sequence[str],
                     batch_size: int, clean: bool = True, key: dict | None = None) -> TextCache:
    """Encodes the distinct captions in fixed-size jitted batches and writes `path` atomically."""
    if batch_size < 1:
        raise ValueError(f"text cache batch_size={batch_size}: expected >= 1")
    unique = list(dict.fromkeys(captions))
    if not unique:
        raise ValueError("build_text_cache needs at least one caption")
    key = key or cache_key(module, params, tokenizer, clean)
    with warnings.catch_warnings():  # truncation is reported once, by encode_prompts below
        warnings.simplefilter("ignore")
        _, mask = tokenizer([prompt_clean(c) if clean else c for c in unique])
    lengths = mask.sum(axis=1).astype(np.int32)
    rows = []
    for start in range(0, len(unique), batch_size):
        batch = unique[start:start + batch_size]
        padded = batch + [""] * (batch_size - len(batch))  # one shape, one compilation
        emb = np.asarray(encode_prompts(module, params, tokenizer, padded, clean=clean))
        rows += [emb[j, :lengths[start + j]] for j in range(len(batch))]
    cache = TextCache(key, tuple(unique), lengths, np.concatenate(rows, axis=0), path)
    _write(path, cache)
    return cache


def _write(path: str, cache: TextCache) -> None:
    final = runs.user_path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / (final.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, key=np.array(json.dumps(cache.key, sort_keys=True)),
                 captions=np.array(cache.captions, dtype=str), lengths=cache.lengths,
                 flat=cache.flat.astype(np.float32))
    tmp.replace(final)


def load_text_cache(path: str, key: dict) -> TextCache:
    """Reads a cache and checks it was built with `key` (from `cache_key`); errors say what differs."""
    if not runs.user_path(path).is_file():
        raise FileNotFoundError(f"text cache {path!r} does not exist; build it first")
    try:
        with runs.user_path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
            stored = json.loads(str(data["key"]))
            captions = tuple(str(c) for c in data["captions"])
            lengths, flat = data["lengths"], data["flat"]
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"text cache {path!r} is not a readable cache file: {e}") from e
    want = json.loads(json.dumps(key, sort_keys=True))
    diffs = [f"{name}: cache has {stored.get(name)!r}, expected {want.get(name)!r}"
             for name in sorted(set(stored) | set(want)) if stored.get(name) != want.get(name)]
    if diffs:
        raise ValueError(f"text cache {path!r} was built for another encoder or tokenizer ("
                         + "; ".join(diffs) + "); rebuild it")
    return TextCache(stored, captions, lengths, flat, path)
