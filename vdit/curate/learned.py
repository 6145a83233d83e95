"""Learned clip scorers (CLIP caption-video similarity, LAION-style aesthetics), weights by path.

A scorer is any object with `name` (its clips.jsonl column and drop reason), `threshold` (clips
scoring below it are dropped) and `__call__(frames uint8 [N, H, W, 3], caption) -> float`;
`build_learned_scorers` makes the built-in ones from `config.curate.scores`, and callers may pass
their own. With no weights configured nothing is scored, and a notice says so.

Built-ins (PyTorch + transformers, imported only when weights are given):
  clip_score  mean cosine similarity between the caption and each sampled frame, from a
              transformers CLIPModel folder (config, weights, tokenizer and image processor);
  aesthetic   mean over frames of an MLP head on the L2-normalised CLIP image embedding. The head
              is a chain of Linear layers applied in order with nothing between them (the LAION
              improved-aesthetic-predictor layout: `layers.{i}.weight/bias`), from .safetensors
              (safetensors only; a .pth state dict must be converted first).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors.numpy import load_file

log = logging.getLogger(__name__)


class LearnedScorer(Protocol):
    name: str
    threshold: float

    def __call__(self, frames: np.ndarray, caption: str) -> float: ...


def _torch_and_transformers():
    try:  # optional heavy dependencies (the `test` extra), only for learned scores
        import torch
        import transformers
    except ImportError as e:
        raise ImportError("learned curation scores (scores.clip_model) need torch and "
                          f"transformers installed (pip install 'vdit[test]'): {e}") from e
    return torch, transformers


class ClipEncoder:
    """Normalised CLIP embeddings of frames and captions from a transformers CLIPModel folder."""

    def __init__(self, folder: str):
        if not Path(folder, "config.json").is_file():
            raise FileNotFoundError(f"config key 'curate.scores.clip_model' = {folder!r}: not a "
                                    "transformers CLIPModel folder (no config.json)")
        torch, transformers = _torch_and_transformers()
        self._torch = torch
        self.model = transformers.CLIPModel.from_pretrained(folder).eval()
        self.processor = transformers.CLIPProcessor.from_pretrained(folder)

    @staticmethod
    def _pooled(out):
        return getattr(out, "pooler_output", out)  # transformers >= 5 returns a model output

    def images(self, frames: np.ndarray) -> np.ndarray:
        inputs = self.processor(images=list(frames), return_tensors="pt")
        with self._torch.no_grad():
            emb = self._pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        emb = emb.numpy().astype(np.float64)
        return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

    def text(self, caption: str) -> np.ndarray:
        inputs = self.processor(text=[caption], return_tensors="pt", padding=True,
                                truncation=True)
        with self._torch.no_grad():
            emb = self._pooled(self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        emb = emb.numpy()[0].astype(np.float64)
        return emb / np.linalg.norm(emb)


class ClipSimilarity:
    name = "clip_score"

    def __init__(self, encoder: ClipEncoder, threshold: float):
        self.encoder, self.threshold = encoder, threshold

    def __call__(self, frames: np.ndarray, caption: str) -> float:
        if not caption:
            return float("nan")  # nothing to compare; never a drop reason
        return float(np.mean(self.encoder.images(frames) @ self.encoder.text(caption)))


def load_linear_chain(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(weight [out, in], bias [out])] of the Linear layers in a state dict, in layer order."""
    # Weights come from safetensors only: vdit never unpickles a file it is given.
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"config key 'curate.scores.aesthetic_head' = {path!r}: expected a "
                         ".safetensors file (convert a .pth state dict with safetensors first)")
    tensors = load_file(path)
    names = [k[:-len(".weight")] for k, v in tensors.items()
             if k.endswith(".weight") and np.ndim(v) == 2]
    names.sort(key=lambda n: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", n)])
    chain = [(np.asarray(tensors[n + ".weight"], np.float64),
              np.asarray(tensors.get(n + ".bias", 0.0), np.float64)) for n in names]
    for (w0, _), (w1, _) in zip(chain[:-1], chain[1:]):
        if w1.shape[1] != w0.shape[0]:
            raise ValueError(f"aesthetic head {path}: layer widths do not chain "
                             f"({w0.shape} then {w1.shape})")
    if not chain or chain[-1][0].shape[0] != 1:
        raise ValueError(f"aesthetic head {path}: expected Linear layers ending in one output")
    return chain


class AestheticScorer:
    name = "aesthetic"

    def __init__(self, encoder: ClipEncoder, chain, threshold: float):
        self.encoder, self.chain, self.threshold = encoder, chain, threshold

    def __call__(self, frames: np.ndarray, caption: str) -> float:
        x = self.encoder.images(frames)
        if x.shape[-1] != self.chain[0][0].shape[1]:
            raise ValueError(f"aesthetic head expects {self.chain[0][0].shape[1]}-d CLIP "
                             f"embeddings, the CLIP model gives {x.shape[-1]}-d")
        for weight, bias in self.chain:
            x = x @ weight.T + bias
        return float(np.mean(x))


def build_learned_scorers(cfg) -> list[LearnedScorer]:
    """Scorers from `config.curate.scores` paths; none configured -> [] and a logged notice."""
    if not cfg.clip_model:
        if cfg.aesthetic_head:
            raise ValueError("config key 'curate.scores.aesthetic_head' is set but "
                             "'curate.scores.clip_model' is empty: the head scores CLIP image "
                             "embeddings, so give the CLIP model folder too")
        log.info("curate: no learned scorers (scores.clip_model and scores.aesthetic_head are "
                 "empty); CLIP-similarity and aesthetic scores are skipped")
        return []
    encoder = ClipEncoder(cfg.clip_model)
    scorers: list[LearnedScorer] = [ClipSimilarity(encoder, cfg.min_clip_score)]
    if cfg.aesthetic_head:
        scorers.append(AestheticScorer(encoder, load_linear_chain(cfg.aesthetic_head),
                                       cfg.min_aesthetic))
    else:
        log.info("curate: no scores.aesthetic_head given; aesthetic score skipped")
    return scorers
